#!/usr/bin/env python
"""Teacher-forced exit quality of EE-tuned models on held-out chat answers (how the tuning choices were compared).

    python scripts/eval_exits.py --nemo a.nemo b.nemo --prompts 32 --max-tokens 64

The first model's full depth answers the chat prompts (stdlib validation split, the benchmark's slice;
greedy, stopping at eos); every model (same backbone) is then scored on those answers: per-exit agreement
with the final layer, and the loosest single max-prob threshold keeping >= --target agreement, its mean
depth and ideal speedup (nemo_ee.inference.bench_real.exit_quality). One JSON line per model.
"""
import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--nemo", nargs="+", required=True, help="EE-tuned .nemo files of one backbone")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--target", type=float, default=0.98)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from nemo_ee.data.chat_prompts import BENCH_OFFSET, chat_prompt_ids
    from nemo_ee.inference.bench_real import exit_quality
    from nemo_ee.inference.generate import GenerationParams, generate
    from nemo_ee.inference.loading import CheckpointError, load_nemo_for_inference

    torch.set_num_threads(args.threads)
    try:
        first = load_nemo_for_inference(args.nemo[0])
        prompts = chat_prompt_ids(first.tokenizer, args.prompts, BENCH_OFFSET)
        params = GenerationParams(max_tokens=args.max_tokens, stop_token_ids=tuple(first.tokenizer.eos_ids))
        answers = [g.token_ids for i in range(0, len(prompts), 8)
                   for g in generate(first.model, prompts[i:i + 8], params)]
        for path in args.nemo:
            nemo = first if path == args.nemo[0] else load_nemo_for_inference(path)
            print(json.dumps({"nemo": path, **exit_quality(nemo.model, prompts, answers, args.target)}), flush=True)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
