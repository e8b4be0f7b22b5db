#!/usr/bin/env python
"""Profile decode steps of an early-exit .nemo: torch ops per step (calls, ms), matmul share, time outside ops.

    python scripts/profile_decode.py --nemo outputs/pipeline_tiny/real_calibrate/real_calibrated.nemo
    python scripts/profile_decode.py --nemo m.nemo --batch 8 --exit-layer 8   # draft steps at exit layer 8

One torch thread by default (as the benchmarks); what is measured is in nemo_ee/inference/profile.py.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--nemo", required=True, help="an early-exit .nemo")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--context", type=int, default=64, help="cached positions before the profiled steps")
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--exit-layer", type=int, help="every step leaves at this exit layer (default: full depth)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--rows", type=int, default=25, help="ops shown")
    args = p.parse_args(argv)
    for name in ("batch", "context", "steps", "threads", "rows"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be >= 1")

    import torch

    from nemo_ee.inference.loading import CheckpointError, load_nemo_for_inference
    from nemo_ee.inference.profile import format_profile, profile_step

    torch.set_num_threads(args.threads)
    try:
        nemo = load_nemo_for_inference(args.nemo)
        result = profile_step(nemo.model, args.batch, args.context, args.steps, args.exit_layer, args.rows)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_profile(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
