"""The logic behind scripts/generate.py (Hydra, conf/ee_generate.yaml) and scripts/calibrate.py (argparse).

Both load the .nemo first (:func:`nemo_ee.inference.loading.load_nemo_for_inference`: a missing, corrupt or
mismatched file is a clear error before anything else), then validate the request, then work. User errors
become ``error: <message>`` on stderr and exit code 2 (:func:`run_command`).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from nemo_ee.atomic import atomic_path
from nemo_ee.inference.loading import CONFIG, CheckpointError, check_nemo_file, inference_defaults

USER_ERRORS = (CheckpointError, FileNotFoundError, FileExistsError, ValueError, KeyError)


def run_command(fn: Callable[[], Any]) -> int:
    """Run ``fn``; a user error prints ``error: ...`` to stderr and gives exit code 2."""
    try:
        fn()
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------- prompts
def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a file: a ``.json`` list of strings (multi-line prompts), else one prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts_file {path}: a .json prompts file must hold a list of strings")
        return prompts
    return [line for line in text.splitlines() if line.strip()]


def gather_prompts(prompts: Any, prompts_file: Optional[str]) -> list[str]:
    """Command-line prompts (a string or a list of strings) followed by those of ``prompts_file``."""
    items = [] if prompts is None else [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if prompts_file:
        items += read_prompts(prompts_file)
    if not items:
        raise ValueError("no prompts: give prompts='[\"def f(\", \"import \"]' or prompts_file=FILE")
    if any(p == "" for p in items):
        raise ValueError("a prompt is empty: every prompt needs at least one token")
    return items


def validation_prompts(nemo: Any, num_prompts: int, prompt_tokens: int, corpus_root: Optional[str] = None) -> list[list[int]]:
    """``num_prompts`` token prompts of ``prompt_tokens`` tokens, evenly spaced over the validation split of
    the corpus in the .nemo's data section (or ``corpus_root``); tokenized once and cached like training data."""
    from nemo_ee.data import corpus_fingerprint, split_files, tokenize_corpus
    from nemo_ee.models.nemo_model import _cache_dir, _corpus_spec
    from omegaconf import OmegaConf

    if num_prompts < 1 or prompt_tokens < 1:
        raise ValueError(f"num_prompts={num_prompts} and prompt_tokens={prompt_tokens} must be >= 1")
    data = OmegaConf.merge(nemo.cfg.data, {"corpus_root": corpus_root} if corpus_root else {})
    spec = _corpus_spec(data)
    _, val_files = split_files(spec)
    if not val_files:
        raise ValueError(f"the corpus at {spec.root_path} has no validation files")
    key = f"{corpus_fingerprint(spec)}-{nemo.tokenizer.fingerprint[:16]}"  # the cache file of build_datasets
    tokens = tokenize_corpus(val_files, nemo.tokenizer, _cache_dir(nemo.cfg) / f"tokens-{key}-val.npy")
    room = len(tokens) - prompt_tokens
    if room < 0:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than prompt_tokens={prompt_tokens}")
    starts = [room * i // max(1, num_prompts - 1) if num_prompts > 1 else 0 for i in range(num_prompts)]
    return [[int(t) for t in tokens[s:s + prompt_tokens]] for s in starts]


def conversations(cfg: Any) -> list[list[dict]]:
    """The chat conversations of a generate request: ``messages`` (one conversation, a list of
    {role, content}, or a list of them), or, with ``chat=true``, each prompt as one user message (after
    ``system``, when given). Empty when the request is plain text."""
    from omegaconf import OmegaConf

    from nemo_ee.data import check_messages

    messages = cfg.get("messages")
    if messages is not None and OmegaConf.is_config(messages):
        messages = OmegaConf.to_container(messages, resolve=True)
    if messages:
        if cfg.get("prompts") or cfg.get("prompts_file"):
            raise ValueError("give either messages=... or prompts / prompts_file, not both")
        convs = messages if isinstance(messages[0], (list, tuple)) else [messages]
        return [check_messages(list(c)) for c in convs]
    if not cfg.get("chat"):
        if cfg.get("system"):
            raise ValueError("system=... needs chat=true (or messages=...)")
        return []
    system = [{"role": "system", "content": str(cfg.system)}] if cfg.get("system") else []
    return [system + [{"role": "user", "content": text}]
            for text in gather_prompts(cfg.get("prompts"), cfg.get("prompts_file"))]


def prompt_ids(tokenizer: Any, cfg: Any) -> tuple[list[str], list[list[int]]]:
    """(texts to print, token ids) of a generate request: plain prompts tokenized, or chat conversations
    through the tokenizer's chat template (with the assistant's generation prompt)."""
    convs = conversations(cfg)
    if not convs:
        texts = gather_prompts(cfg.get("prompts"), cfg.get("prompts_file"))
        return texts, [tokenizer.encode(t) for t in texts]
    ids = [tokenizer.apply_chat_template(c) for c in convs]
    return [tokenizer.decode(i) for i in ids], ids


# ---------------------------------------------------------------------------------------------- generate
def stop_token_ids(tokenizer: Any, stop_words: Sequence[str], stop_at_eos: bool) -> tuple:
    """Stop words -> token ids; each must be exactly one token (the decoder stops on single tokens). With
    ``stop_at_eos`` the model's own end ids come first (an imported model's generation_config eos ids)."""
    ids = list(tokenizer.eos_ids) if stop_at_eos else []
    for word in stop_words or ():
        encoded = tokenizer.encode(str(word))
        if len(encoded) != 1:
            raise ValueError(f"stop word {str(word)!r} is {len(encoded)} tokens {encoded}; stop words must be "
                             "single tokens of the model's tokenizer")
        ids.append(encoded[0])
    return tuple(dict.fromkeys(ids))


def request_params(cfg: Any, defaults: dict, stops: tuple) -> Any:
    """GenerationParams from the request ``cfg``; unset (null) fields come from the .nemo's ``defaults``.

    A ``threshold`` or ``exit_thresholds`` in the request replaces the calibrated thresholds; an
    ``exit_policy`` other than the calibrated one needs its own threshold.
    """
    from nemo_ee.inference.generate import GenerationParams

    get = cfg.get
    kwargs = dict(defaults)
    calibrated = bool(defaults.get("exit_thresholds")) or defaults.get("threshold") is not None
    if get("threshold") is not None or get("exit_thresholds") is not None:
        kwargs.pop("exit_thresholds", None)
        kwargs.pop("threshold", None)
    elif calibrated and get("exit_policy") not in (None, defaults.get("exit_policy")):
        raise ValueError(f"exit_policy={get('exit_policy')} but the .nemo's thresholds were calibrated for "
                         f"{defaults.get('exit_policy')}: give threshold=... for {get('exit_policy')}")
    if get("exit_thresholds") is not None:
        kwargs["exit_thresholds"] = {int(k): float(v) for k, v in dict(get("exit_thresholds")).items()}
    for key in ("exit_policy", "threshold", "decode_mode", "draft_exit", "draft_threshold"):
        if get(key) is not None:
            kwargs[key] = get(key)
    if get("active_exits") is not None:
        kwargs["active_exits"] = tuple(int(a) for a in get("active_exits"))
    for key in ("max_tokens", "num_draft", "temperature", "top_k", "top_p", "seed"):
        if get(key) is not None:
            kwargs[key] = get(key)
    return GenerationParams(**kwargs, stop_token_ids=stops)


def run_generate(cfg: Any, out: Any = None) -> dict:
    """Load ``cfg.nemo``, generate for every prompt (batched), print the texts and a STATS line."""
    from nemo_ee.inference.generate import check_prompt, generate
    from nemo_ee.inference.loading import load_nemo_for_inference
    from nemo_ee.inference.render import exit_stats, format_stats, mark_exits

    out = out or sys.stdout
    if not cfg.get("nemo"):
        raise ValueError("nemo=PATH is required (the .nemo model to generate with)")
    nemo = load_nemo_for_inference(str(cfg.nemo))
    model, tokenizer = nemo.model, nemo.tokenizer
    texts, prompts = prompt_ids(tokenizer, cfg)
    params = request_params(cfg, inference_defaults(nemo.cfg),
                            stop_token_ids(tokenizer, cfg.get("stop_words") or [], bool(cfg.get("stop_at_eos", True))))
    params.rule(model.ee_config.exit_layer_nums)  # unknown exit layers are an error before any work
    for text, ids in zip(texts, prompts):
        try:
            check_prompt(ids, model)
        except ValueError as err:
            raise ValueError(f"prompt {text[:40]!r}: {err}") from None
    batch = int(cfg.get("batch_size") or len(prompts))
    if batch < 1:
        raise ValueError(f"batch_size={batch} must be >= 1 (or null: all prompts in one batch)")
    start = time.perf_counter()
    gens = []
    for i in range(0, len(prompts), batch):
        gens += generate(model, prompts[i:i + batch], params)
    seconds = time.perf_counter() - start
    show = bool(cfg.get("show_exits", False))
    for i, (text, gen) in enumerate(zip(texts, gens)):
        body = mark_exits(tokenizer, gen.token_ids, gen.exit_layers) if show else tokenizer.decode(gen.token_ids)
        print(f"--- [{i + 1}/{len(texts)}] {len(gen.token_ids)} tokens, finish={gen.finish_reason}, "
              f"mean exit depth {gen.mean_exit_depth:.2f}", file=out)
        print(text + body, file=out)
    stats = exit_stats([g.exit_layers for g in gens], seconds)
    print(f"--- decode_mode={params.decode_mode} exit_policy={params.exit_policy} threshold={params.threshold} "
          f"exit_thresholds={params.exit_thresholds} layers={model.ee_config.num_layers}", file=out)
    print(format_stats(stats), file=out, flush=True)
    return {"params": params, "generations": gens, "prompts": prompts, "stats": stats}


# ---------------------------------------------------------------------------------------------- calibrate
def write_inference_section(src: str | os.PathLike, dst: str | os.PathLike, section: dict) -> Path:
    """Copy the .nemo ``src`` to ``dst`` with the config's ``inference`` section set to ``section``.

    Every other member (weights, tokenizer) is copied byte for byte; the write is atomic (temp + rename),
    so ``dst == src`` updates in place.
    """
    from omegaconf import OmegaConf

    src, dst = Path(src), Path(dst)
    check_nemo_file(src)
    with atomic_path(dst) as tmp:
        with tarfile.open(src, "r:*") as tar_in, tarfile.open(tmp, "w:") as tar_out:
            for member in tar_in.getmembers():
                data = tar_in.extractfile(member) if member.isfile() else None
                if member.isfile() and Path(member.name).name == CONFIG:
                    cfg = OmegaConf.load(data)
                    cfg.inference = section
                    blob = OmegaConf.to_yaml(cfg).encode("utf-8")
                    member, data = copy.copy(member), io.BytesIO(blob)
                    member.size = len(blob)
                tar_out.addfile(member, data)
    return dst


def calibrate_parser() -> argparse.ArgumentParser:
    """The command line of scripts/calibrate.py."""
    from nemo_ee.inference.policies import POLICIES

    p = argparse.ArgumentParser(
        prog="calibrate.py",
        description="Pick per-exit thresholds whose greedy agreement with the full model reaches --target on "
                    "calibration prompts, verify them with real early-exit decoding, and write them into the "
                    ".nemo's config (section inference) so they become generate.py's and Triton's defaults.",
        epilog="example: python scripts/calibrate.py --nemo ee.nemo --out ee_calibrated.nemo --target 0.98")
    p.add_argument("--nemo", required=True, help="input .nemo (an early-exit model)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output .nemo (written atomically; the input is untouched)")
    where.add_argument("--in-place", action="store_true", help="update --nemo itself (atomic replace)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    p.add_argument("--target", type=float, default=0.98, help="greedy token agreement to reach, in (0, 1]")
    p.add_argument("--policy", default="max_prob", help=f"exit policy, one of {list(POLICIES)}")
    p.add_argument("--prompts-file", help="prompts (.json list of strings, else one per line) instead of the "
                                          "validation split of the model's corpus")
    p.add_argument("--chat-prompts", action="store_true",
                   help="chat prompts made from the stdlib's validation split, through the model's chat template "
                        "(for an imported chat model; --num-prompts of them); --prompt-tokens is not used")
    p.add_argument("--num-prompts", type=int, default=32, help="validation prompts to use (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens per validation prompt (default 32)")
    p.add_argument("--corpus-root", help="corpus directory for the validation split (default: the .nemo's data)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--exit-vocab", type=int, metavar="N",
                   help="exits score only the N tokens the full model generates most often on the calibration "
                        "prompts (each exit then reads N rows of its output matrix; default: every token)")
    p.add_argument("--draft", action="store_true",
                   help="also choose the self-speculative draft exit, length and threshold (measures step costs)")
    p.add_argument("--max-rounds", type=int, default=3,
                   help="tightenings of the per-token target if verification misses --target (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_calibrate(args: argparse.Namespace, out: Any = None) -> Any:
    """Validate ``args``, load the .nemo, calibrate, print the table and write the .nemo."""
    from nemo_ee.inference.calibrate import calibrate, check_calibration_args, format_result
    from nemo_ee.inference.loading import load_nemo_for_inference

    out = out or sys.stdout
    check_calibration_args(args.target, args.policy, args.max_tokens, args.max_rounds)
    dst = Path(args.nemo) if args.in_place else Path(args.out)
    if dst.suffix != ".nemo":
        raise ValueError(f"--out {dst} must end in .nemo")
    if not args.in_place and dst.exists() and not args.overwrite:
        raise FileExistsError(f"--out {dst} exists; add --overwrite to replace it (or use --in-place)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    if args.exit_vocab is not None and args.exit_vocab < 1:
        raise ValueError(f"--exit-vocab {args.exit_vocab} must be >= 1")
    if args.chat_prompts and args.prompts_file:
        raise ValueError("give either --chat-prompts or --prompts-file, not both")
    nemo = load_nemo_for_inference(args.nemo)
    if args.chat_prompts:
        from nemo_ee.data.chat_prompts import CALIBRATION_OFFSET, chat_prompt_ids

        prompts = chat_prompt_ids(nemo.tokenizer, args.num_prompts, CALIBRATION_OFFSET)
    elif args.prompts_file:
        prompts = [nemo.tokenizer.encode(t) for t in read_prompts(args.prompts_file)]
    else:
        prompts = validation_prompts(nemo, args.num_prompts, args.prompt_tokens, args.corpus_root)
    result = calibrate(nemo.model, prompts, args.target, args.policy, args.max_tokens, args.batch_size,
                       args.max_rounds, progress=not args.no_progress, exit_vocab_size=args.exit_vocab,
                       choose_draft=args.draft)
    print(format_result(result, nemo.model.ee_config.num_layers), file=out)
    write_inference_section(args.nemo, dst, result.inference_section())
    print(f"wrote {dst} (inference.exit_thresholds={result.inference_section()['exit_thresholds']})",
          file=out, flush=True)
    return result


def calibrate_main(argv: Optional[Sequence[str]] = None) -> int:
    """scripts/calibrate.py: parse ``argv`` and run; exit code 2 with ``error: ...`` on bad input."""
    args = calibrate_parser().parse_args(argv)
    return run_command(lambda: run_calibrate(args))
