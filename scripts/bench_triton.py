#!/usr/bin/env python
"""Tokens/s and latency through Triton Inference Server vs in-process decoding of the same model (issue 6).

    python scripts/bench_triton.py                     # the cached model of bench_decode.py (trained once if missing)
    python scripts/bench_triton.py --nemo my.nemo      # an existing early-exit .nemo
    python scripts/bench_triton.py --quick             # a tiny model, 8 short prompts (a smoke test, ~2 minutes)

What it does, in one run:
  1. loads the model in this process and picks the prompts: --prompts windows of --prompt-len tokens of
     the model's validation split (or the lines of --prompts-file);
  2. exports a model repository (scripts/export_triton.py's writer) to a temporary directory and starts
     a real tritonserver on free 127.0.0.1 ports (scripts/serve_triton.py's launcher), with the same torch
     threads (--threads) and an in-flight batch of 8; it is stopped at the end, on an error and on Ctrl-C;
  3. measures, after an untimed warm-up, for 1, 4 and 8 concurrent clients, alternating the two sides:
       in-process  the server's decode loop without Triton: a ContinuousBatcher with 8 rows in this
                   process, fed by a closed loop keeping that many requests in flight;
       triton      that many client threads, each sending its next prompt over a gRPC stream
                   (tritonclient; one response per token, --no-stream: one final response) when its
                   previous answer is complete;
     and sequential batch-1 generate() in this process (whose answers are the reference).
Decoding is greedy with no stop token (every request generates --max-tokens tokens), early exit with
--exit-policy/--threshold, else the .nemo's calibrated thresholds, else max_prob at 0.9.
Tokens/s = generated tokens / wall seconds of a pass (median over --repeats passes). Latency = a request's
send -> last response, pooled over passes (p50/p99); "1st tok" = send -> first response.

The last line printed is exactly
  RESULT triton_vs_inprocess=<r> lost_requests=<n> p99_latency_8_clients_s=<x>
r = Triton tokens/s with 8 clients / in-process tokens/s with 8 requests in flight; n = Triton requests
(all timed passes, all concurrencies) that failed, did not finish, or whose token ids or exit layers
differ from the in-process batch-1 answer; x = p99 request latency with 8 clients, seconds.
Targets (issue 6): r >= 0.9, n == 0. The machine's load changes wall-clock numbers: note `uptime`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring for what is measured)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nemo", default=None, help="early-exit .nemo (default: bench_decode.py's cached benchmark model, "
                                                "trained once if missing; with --quick its tiny model)")
    p.add_argument("--quick", action="store_true", help="smoke test: 8 prompts of 16 tokens, 8 new tokens, 1 pass")
    p.add_argument("--prompts", type=int, default=None, help="requests per pass (default 16; quick 8)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; quick 16)")
    p.add_argument("--prompts-file", default=None, help="prompts, one a line (or a .json list), cycled to --prompts")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 64; quick 8)")
    p.add_argument("--exit-policy", default=None, help="max_prob | entropy | top2_margin (default: calibrated, else max_prob)")
    p.add_argument("--threshold", type=float, default=None,
                   help="one threshold for every exit (default: the .nemo's calibrated ones, else 0.9)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per side and concurrency (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, here and in the server (default 1)")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="Triton answers each request with one final response instead of one per token")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the server to start / between responses")
    p.add_argument("--cache-dir", default=None, help="bench_decode.py's model cache (default $NEMO_EE_CACHE or ~/.cache/nemo_ee)")
    args = p.parse_args(argv)
    for key, (full, quick) in {"prompts": (16, 8), "prompt_len": (32, 16), "max_tokens": (64, 8),
                               "repeats": (3, 1)}.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    for key in ("prompts", "prompt_len", "max_tokens", "repeats", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} {getattr(args, key)} must be >= 1")
    return args


def bench_decode_model(quick: bool, cache_dir: str | None) -> Path:
    """bench_decode.py's cached model (its default or --quick recipe), trained by it first if missing."""
    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "scripts" / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.trained_model(module.QUICK_MODEL if quick else module.DEFAULT_MODEL, cache_dir)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # like Ctrl-C: the server is stopped on the way out
    import torch

    from nemo_ee.deploy.triton import bench
    from nemo_ee.deploy.triton.client import RequestError
    from nemo_ee.deploy.triton.server import ServerStartError

    torch.set_num_threads(args.threads)
    try:
        path = Path(args.nemo) if args.nemo else bench_decode_model(args.quick, args.cache_dir)
        summary = bench.run_benchmark(path, args)
    except (ServerStartError, RequestError, OSError, ValueError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; tritonserver stopped", file=sys.stderr, flush=True)
        return 130
    print(bench.table(summary))
    for message in summary["errors"][:5]:
        print(f"failed request: {message}")
    mismatch = {c: row["inprocess_mismatch"] for c, row in summary["rows"].items() if row["inprocess_mismatch"]}
    if mismatch:
        print(f"note: in-process batched answers differing from batch 1, by concurrency: {mismatch}")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(bench.result_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
