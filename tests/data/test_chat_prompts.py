"""Chat prompts from the corpus (nemo_ee.data.chat_prompts): deterministic, split-disjoint, every template."""
from __future__ import annotations

import textwrap

import pytest

from nemo_ee.data.chat_prompts import TEMPLATES, as_conversations, chat_prompt_ids, chat_prompts
from nemo_ee.data.corpus import CorpusSpec, split_files

PREFIXES = [t.split("{")[0] for t in TEMPLATES]
SMALL = CorpusSpec(max_files=120)  # a sorted prefix of the stdlib: cheap to parse

A_PY = '''\
def add(a, b):
    """Add two numbers and return the sum."""
    return a + b


def _hidden(x):
    """A private helper that is always skipped."""
    return x


def nodoc(x):
    return x


def short(x):
    """Too short"""
    return x


def long_one(x):
    """A function that is far too long to be shown."""
''' + "".join(f"    x = x + {i}\n" for i in range(30)) + '''\
    return x


class Box:
    def area(self, scale):
        """Return the area of the box,
        scaled by a factor.

        More details that are not used."""
        return scale
'''
B_PY = '''\
def greet(name):
    """Greet someone by their name politely."""
    return "hi " + name


async def mul(a, b):
    """Multiply two numbers and return the product."""
    return a * b
'''
C_PY = '''\
def only(path, *rest, flag=False):
    """The one documented function of this file."""
    return path
'''
AREA_CODE = textwrap.dedent('''\
    def area(self, scale):
        """Return the area of the box,
        scaled by a factor.

        More details that are not used."""
        return scale''')


@pytest.fixture
def toy_spec(tmp_path):
    """train: a.py (add, Box.area) and bad.py (not Python); val: b.py (greet, mul) and pkg/c.py (only)
    (the split is by a hash of the relative path: 967, 606 >= 500 train; 240, 11 < 500 val)."""
    (tmp_path / "a.py").write_text(A_PY)
    (tmp_path / "b.py").write_text(B_PY)
    (tmp_path / "bad.py").write_text('def broken(:\n    """Not valid Python at all."""\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "c.py").write_text(C_PY)
    (tmp_path / "notes.txt").write_text("def f():\n    'not a .py file, never read'\n")
    spec = CorpusSpec(root=str(tmp_path), val_fraction=0.5)
    train, val = split_files(spec)
    assert [p.name for p in train] == ["a.py", "bad.py"] and [p.name for p in val] == ["b.py", "c.py"]
    return spec


@pytest.fixture(scope="module")
def train_300():
    return chat_prompts(300, "train")


def test_same_seed_same_prompts_other_seed_others():
    val = chat_prompts(40, "val")
    assert len(val) == 40 and all(isinstance(p, str) and p for p in val)
    assert chat_prompts(40, "val") == val
    assert chat_prompts(40, "val", seed=1) != val
    assert chat_prompts(12, "val") == val[:12]  # a shorter request is a prefix of a longer one
    train = chat_prompts(30, "train", spec=SMALL)
    assert chat_prompts(30, "train", spec=SMALL) == train
    assert chat_prompts(30, "train", seed=5, spec=SMALL) != train
    assert chat_prompts(7, "train", spec=SMALL) == train[:7]
    assert not set(train) & set(val)


def test_train_and_val_never_share_a_function(train_300):
    val = chat_prompts(40, "val")
    assert len(train_300) == 300
    assert not set(val) & set(train_300)
    # not even the function itself under another template: no val code block appears in a train prompt
    blocks = [p.split("```python\n", 1)[1] for p in val if "```python\n" in p]
    assert len(blocks) >= 15
    joined = "\n".join(train_300)
    assert not [b for b in blocks if b in joined]


def test_templates_cycle(train_300):
    n = len(TEMPLATES)
    assert len(set(PREFIXES)) == n == 6
    for prompts in (train_300, chat_prompts(2 * n + 1, "val", seed=3)):
        assert len({next(i for i, pre in enumerate(PREFIXES) if p.startswith(pre)) for p in prompts[:n]}) == n
        for i, p in enumerate(prompts):
            assert p.startswith(PREFIXES[i % n]), (i, p[:80])


def test_exact_prompts_of_a_toy_corpus(toy_spec):
    add = "Write a Python function `add(a, b)` that does this: Add two numbers and return the sum."
    area_first = "Write a Python function `area(scale)` that does this: Return the area of the box, scaled by a factor."
    area = f"Explain briefly what this Python function does:\n```python\n{AREA_CODE}\n```"
    add_second = ("Explain briefly what this Python function does:\n```python\ndef add(a, b):\n"
                  '    """Add two numbers and return the sum."""\n    return a + b\n```')
    seen = set()
    for seed in range(8):
        got = chat_prompts(2, "train", seed=seed, spec=toy_spec)
        assert got in ([add, area], [area_first, add_second]), got
        seen.add(tuple(got))
    assert len(seen) == 2  # the seed shuffles the functions of a file
    with pytest.raises(ValueError) as err:
        chat_prompts(3, "train", spec=toy_spec)
    assert str(err.value) == "the corpus train split gives only 2 prompts, fewer than count=3"


def test_round_robin_over_files_before_repeats(toy_spec):
    names = {"greet": "b", "mul": "b", "only": "c"}
    for seed in range(6):
        got = chat_prompts(3, "val", seed=seed, spec=toy_spec)
        used = [next(n for n in names if f"`{n}" in p or f"def {n}(" in p) for p in got]
        assert sorted(used) == ["greet", "mul", "only"]
        assert {names[used[0]], names[used[1]]} == {"b", "c"} and names[used[2]] == "b"
        if used[0] == "only" or used[1] == "only":
            only = got[used.index("only")]
            # only plain positional parameters are named (``*rest`` and keyword-only ``flag`` are left out)
            assert only in ("Write a Python function `only(path)` that does this: "
                            "The one documented function of this file.",
                            f"Explain briefly what this Python function does:\n```python\n{C_PY.rstrip()}\n```")
        assert "async def mul(a, b):" in got[used.index("mul")] or "`mul" in got[used.index("mul")]
    with pytest.raises(ValueError, match="^the corpus val split gives only 3 prompts, fewer than count=4$"):
        chat_prompts(4, "val", spec=toy_spec)


def test_count_larger_than_the_split_with_split_files_patched(monkeypatch, tmp_path):
    import nemo_ee.data.chat_prompts as cp

    (tmp_path / "one.py").write_text(B_PY)
    monkeypatch.setattr(cp, "split_files", lambda spec: ([], [tmp_path / "one.py"]))
    assert len(chat_prompts(2, "val")) == 2
    with pytest.raises(ValueError, match="^the corpus val split gives only 2 prompts, fewer than count=5$"):
        chat_prompts(5, "val")
    with pytest.raises(ValueError, match="^the corpus train split gives only 0 prompts, fewer than count=1$"):
        chat_prompts(1, "train")


@pytest.mark.parametrize("split", ["test", "validation", "", None, "Train"])
def test_bad_split(split):
    with pytest.raises(ValueError) as err:
        chat_prompts(3, split)
    assert str(err.value) == f"split={split!r} is not one of ['train', 'val']"


@pytest.mark.parametrize("count", [0, -1, True, False, "3", 2.0, None])
def test_bad_count(count):
    with pytest.raises(ValueError) as err:
        chat_prompts(count, "val")
    assert str(err.value) == f"count={count!r} must be an integer >= 1"


def test_as_conversations():
    assert as_conversations(["a", "b"]) == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    assert as_conversations(["a"], system="sys") == [[{"role": "system", "content": "sys"},
                                                      {"role": "user", "content": "a"}]]
    assert as_conversations(["a"], system="") == [[{"role": "user", "content": "a"}]]
    assert as_conversations([]) == []


def test_chat_prompt_ids_one_list_per_prompt():
    class FakeTokenizer:
        def __init__(self):
            self.calls = []

        def apply_chat_template(self, messages):
            self.calls.append(messages)
            return [len(self.calls), len(messages[0]["content"])]

    tok = FakeTokenizer()
    ids = chat_prompt_ids(tok, 4)
    prompts = chat_prompts(7, "val")  # the validation split (seed 0) by default
    assert tok.calls == [[{"role": "user", "content": p}] for p in prompts[:4]]
    assert ids == [[i + 1, len(p)] for i, p in enumerate(prompts[:4])]
    tok = FakeTokenizer()
    assert chat_prompt_ids(tok, 3, offset=4) == [[i + 1, len(p)] for i, p in enumerate(prompts[4:7])]
    assert tok.calls == [[{"role": "user", "content": p}] for p in prompts[4:7]]


def test_chat_prompt_ids_offset_slices_and_split(monkeypatch):
    import nemo_ee.data.chat_prompts as cp

    assert cp.CALIBRATION_OFFSET < cp.SWEEP_OFFSET < cp.BENCH_OFFSET  # disjoint slices in this order
    seen = []
    monkeypatch.setattr(cp, "chat_prompts", lambda count, split: seen.append((count, split)) or ["p", "qq", "rrr"])
    tok = type("T", (), {"apply_chat_template": lambda self, m: [ord(c) for c in m[0]["content"]]})()
    assert chat_prompt_ids(tok, 2, offset=1, split="train") == [[113, 113], [114, 114, 114]]
    assert seen == [(3, "train")]
