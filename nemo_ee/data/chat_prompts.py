"""Chat prompts made from the embedded corpus (CPython's stdlib): varied coding requests for an instruct model.

A real instruct model is served chat requests, so its exits are tuned, calibrated and measured on what it
answers to them. Each prompt comes from one documented stdlib function, in one of several forms (write a
function to a docstring, explain a function's code, name what it returns, write a test for it, give a
one-line summary). Train-split files give tuning prompts; validation-split files give calibration and
benchmark prompts, so the two never share a function.
"""
from __future__ import annotations

import ast
import random
import textwrap
from pathlib import Path
from typing import Iterator, Sequence

from .corpus import CorpusSpec, split_files

MAX_CODE_LINES = 24

TEMPLATES = (
    "Write a Python function `{name}({args})` that does this: {doc}",
    "Explain briefly what this Python function does:\n```python\n{code}\n```",
    "What does the Python function `{name}` return? Its docstring says: {doc}",
    "Write a unit test with pytest for this function:\n```python\n{code}\n```",
    "Summarise in one sentence what this code does:\n```python\n{code}\n```",
    "How would you use `{name}({args})` in a Python program? It is documented as: {doc}",
)


def _functions(path: Path) -> Iterator[tuple[str, str, str, str]]:
    """(name, args, first docstring line, source) of the short documented functions of one file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno is None or node.end_lineno - node.lineno + 1 > MAX_CODE_LINES:
            continue
        first = " ".join(doc.strip().split("\n\n")[0].split())
        if not 12 <= len(first) <= 240:
            continue
        args = ", ".join(a.arg for a in node.args.args if a.arg not in ("self", "cls"))
        code = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
        yield node.name, args, first, code


def chat_prompts(count: int, split: str = "train", seed: int = 0, spec: CorpusSpec | None = None) -> list[str]:
    """``count`` user messages from documented functions of the corpus ``split`` ("train" or "val"),
    templates cycling so every form appears; the same arguments give the same prompts."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is not one of ['train', 'val']")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r} must be an integer >= 1")
    train, val = split_files(spec or CorpusSpec())
    files = list(train if split == "train" else val)
    rng = random.Random(seed)
    rng.shuffle(files)
    per_file = []
    for path in files:
        found = list(_functions(path))
        rng.shuffle(found)
        if found:
            per_file.append(found)
    prompts: list[str] = []
    for rank in range(max((len(f) for f in per_file), default=0)):  # round robin: files before repeats
        for found in per_file:
            if rank < len(found):
                name, args, doc, code = found[rank]
                template = TEMPLATES[len(prompts) % len(TEMPLATES)]
                prompts.append(template.format(name=name, args=args, doc=doc, code=code))
                if len(prompts) == count:
                    return prompts
    raise ValueError(f"the corpus {split} split gives only {len(prompts)} prompts, fewer than count={count}")


def as_conversations(prompts: Sequence[str], system: str | None = None) -> list[list[dict]]:
    """Each prompt as a one-turn chat (after an optional system message)."""
    head = [{"role": "system", "content": system}] if system else []
    return [head + [{"role": "user", "content": p}] for p in prompts]


# Disjoint slices of the validation prompts (seed 0): what calibrates is never what is measured.
CALIBRATION_OFFSET, SWEEP_OFFSET, BENCH_OFFSET = 0, 64, 128


def chat_prompt_ids(tokenizer, count: int, offset: int = 0, split: str = "val") -> list[list[int]]:
    """Prompts ``offset .. offset + count`` of :func:`chat_prompts` (seed 0) as token ids through the tokenizer's
    chat template; the validation split by default (never a tuning prompt's function)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}])
            for p in chat_prompts(offset + count, split)[offset:]]
