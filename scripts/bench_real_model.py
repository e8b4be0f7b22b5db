#!/usr/bin/env python
"""The real-model benchmark: nemo_ee decoding vs Hugging Face transformers on the same weights, one run.

    python scripts/bench_real_model.py --nemo smollm2_ee_calibrated.nemo          # defaults: 8 prompts x 64 tokens
    python scripts/bench_real_model.py --nemo smollm2_ee_calibrated.nemo --quick  # a smoke run (2 prompts x 16)

--nemo: an EE-tuned, calibrated .nemo of an imported model (the main job writes one for SmolLM2-135M-Instruct);
--hf-dir: the HF folder it was converted from (default: the cached HF folder of the default SmolLM2 GGUF).
What is measured and how is in nemo_ee/inference/bench_real.py. The last line printed is
  RESULT full_vs_hf_b1=<r> full_vs_hf_b8=<r> roofline_b1=<f> ee_speedup=<s> ee_agreement=<a> ee_mean_depth=<d>
         ee_b8_speedup=<s> selfspec_speedup=<s> selfspec_vs_hf_generate=<r> selfspec_b8_speedup=<s>
         selfspec_adaptive_vs_fixed=<r> hf_ee_speedup=<r> identical=<true|false> selfspec_identical=<true|false>
(one line). --out writes bench_real_model.json and bench_real_batches.png (tokens/s by batch size) there.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--nemo", required=True, help="EE-tuned, calibrated .nemo of an imported model")
    p.add_argument("--hf-dir", help="the HF folder the .nemo was converted from (default: the default SmolLM2's)")
    p.add_argument("--prompts", type=int, default=8, help="chat prompts (stdlib validation split) at batch 1")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt, both sides")
    p.add_argument("--batch", type=int, default=8, help="prompts of the batched comparison")
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the prompts")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="cpu: this process's CPU time")
    p.add_argument("--draft-exit", type=int, help="self-speculative draft exit layer (default: best predicted)")
    p.add_argument("--num-draft", type=int, help="self-speculative drafts per verification (default: best predicted)")
    p.add_argument("--batches", default="1,2,4,8,16", help="batch sizes of the tokens/s-by-batch sweep and plot")
    p.add_argument("--quick", action="store_true", help="2 prompts x 16 tokens, batch 2, batches 1,2")
    p.add_argument("--out", help="folder for bench_real_model.json")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.batch, args.batches = 2, 16, 2, "1,2"
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches {args.batches!r} must be comma-separated integers")
    if not batches or min(batches) < 1:
        p.error(f"--batches {args.batches!r} must be batch sizes >= 1")
    for name in ("prompts", "new_tokens", "batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")

    import torch

    from nemo_ee.checkpoint.hf.gguf import cached_hf_dir, locate_gguf
    from nemo_ee.inference.bench_real import result_line, run
    from nemo_ee.inference.loading import CheckpointError, load_nemo_for_inference

    torch.set_num_threads(args.threads)
    try:
        nemo = load_nemo_for_inference(args.nemo)
        hf_dir = args.hf_dir or cached_hf_dir(locate_gguf())
        result = run(nemo, hf_dir, args.prompts, args.new_tokens, args.batch, args.repeats, args.clock,
                     args.draft_exit, args.num_draft, args.out, log=lambda s: print(s, flush=True), batches=batches)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result_line(result["values"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
