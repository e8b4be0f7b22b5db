"""Tuning data from the model itself: its own greedy answers to varied chat prompts (self-distillation data).

An exit is only useful where it agrees with the full model on what the model will generate. Training the
exits on the model's own answers puts them on that distribution (the stdlib code of the corpus is a
different one: code, not chat). The prompts come from the corpus's train split
(:func:`nemo_ee.data.chat_prompts.chat_prompts`); each conversation (chat template + answer, ending at the
model's eos when it stopped there) is appended to one token stream, saved as ``.npy`` with a JSON sidecar.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm.auto import tqdm

from nemo_ee.atomic import atomic_path
from nemo_ee.data.chat_prompts import chat_prompts
from nemo_ee.data.dataset import token_dtype


def generate_tuning_data(nemo: Any, out: str | Path, num_prompts: int = 64, max_tokens: int = 128,
                         batch_size: int = 16, seed: int = 0, system: Optional[str] = None,
                         progress: bool = True) -> dict:
    """Write the model's greedy answers to ``num_prompts`` chat prompts as one token stream ``out`` (.npy);
    returns the sidecar's statistics. ``nemo``: an EarlyExitGPTNeMoModel with a chat template."""
    from nemo_ee.inference.generate import GenerationParams, generate

    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"out={out} must end in .npy")
    for name, value in (("num_prompts", num_prompts), ("max_tokens", max_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    tokenizer = nemo.tokenizer
    if not tokenizer.chat_template:
        raise ValueError("the model's tokenizer has no chat template: tune on the corpus instead (data.corpus)")
    head = [{"role": "system", "content": system}] if system else []
    prompts = [tokenizer.apply_chat_template(head + [{"role": "user", "content": p}])
               for p in chat_prompts(num_prompts, "train", seed=seed)]
    params = GenerationParams(max_tokens=max_tokens, stop_token_ids=tuple(tokenizer.eos_ids))
    stream: list[int] = []
    answer_tokens, stopped, start = 0, 0, time.perf_counter()
    with tqdm(total=len(prompts), desc="generating tuning data", unit="prompt", disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            for prompt, gen in zip(batch, generate(nemo.model, batch, params)):
                stream += list(prompt) + list(gen.token_ids)
                answer_tokens += len(gen.token_ids)
                stopped += gen.finish_reason == "stop"
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    tokens = np.asarray(stream, dtype=token_dtype(nemo.ee_config.vocab_size))
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)
    stats = {"prompts": len(prompts), "tokens": int(len(tokens)), "answer_tokens": answer_tokens,
             "stopped_at_eos": stopped, "max_tokens": max_tokens, "seed": seed, "seconds": round(seconds, 1),
             "answer_tokens_per_s": round(answer_tokens / max(seconds, 1e-9), 2)}
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: Optional[list[str]] = None) -> None:
    """``scripts/make_tuning_data.py``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write a model's own greedy answers to chat prompts made from the "
                                     "stdlib (train split) as a token stream for EE-Tuning's data.token_files.")
    parser.add_argument("--nemo", required=True, help="the .nemo (an imported chat model, e.g. SmolLM2)")
    parser.add_argument("--out", required=True, help="output .npy (a .json with statistics is written beside it)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128, help="answer tokens at most per prompt")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="which prompts (a shuffle of the train split)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    import torch

    from nemo_ee.inference.loading import load_nemo_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if not args.out.endswith(".npy"):
            raise ValueError(f"--out {args.out} must end in .npy")
        nemo = load_nemo_for_inference(args.nemo)
        stats = generate_tuning_data(nemo, args.out, args.num_prompts, args.max_tokens, args.batch_size, args.seed)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps(stats))
