"""Where a decode step's time goes (scripts/profile_decode.py): torch ops per step, and the rest.

One engine at batch ``batch`` after a prefill of ``context`` tokens; each profiled step feeds one token per row
at full depth (or forced out at an exit) and is then truncated away, so every step sees the same cache. The
table groups torch's profiler events by op: calls and milliseconds per step. ``outside_ops_ms`` is the
profiled step's CPU time outside any torch op (the interpreter, the engine's bookkeeping; the profiler inflates
every number, so compare shares); ``matmul_share`` is the part of the ops' time in matrix products, which at batch 1 is the memory-bound weight read (compare with the roofline of
:func:`nemo_ee.inference.bench_real.copy_bandwidth` and :func:`~nemo_ee.inference.bench_real.weight_bytes`).
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from nemo_ee.inference.engine import EarlyExitEngine
from nemo_ee.inference.policies import ExitRule

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


@torch.no_grad()
def profile_step(model: torch.nn.Module, batch: int = 1, context: int = 64, steps: int = 10,
                 exit_layer: Optional[int] = None, rows: int = 25) -> dict:
    """Per-step op table and totals; ``exit_layer``: every step leaves at that exit (a draft step)."""
    from torch.profiler import ProfilerActivity, profile

    if batch < 1 or context < 1 or steps < 1:
        raise ValueError(f"batch={batch}, context={context} and steps={steps} must be >= 1")
    ee = model.ee_config
    rule = ExitRule.full()
    if exit_layer is not None:
        if exit_layer not in ee.exit_layer_nums:
            raise ValueError(f"exit layer {exit_layer} is not an exit of this model (exits at {ee.exit_layer_nums})")
        rule = ExitRule(forced=list(ee.exit_layer_nums).index(exit_layer))
    model.eval()
    engine = EarlyExitEngine(model, batch, context + 2)
    ids = list(range(batch))
    engine.step(ids, [[1 + (i % 7)] * context for i in ids], [ExitRule.full()] * batch)

    def one() -> None:
        engine.step(ids, [[2]] * batch, [rule] * batch)
        for r in ids:
            engine.truncate(r, context)

    for _ in range(3):
        one()
    started = time.process_time()
    for _ in range(steps):
        one()
    step_ms = (time.process_time() - started) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.process_time()
        for _ in range(steps):
            one()
        profiled_ms = (time.process_time() - started) / steps * 1e3
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    table = [{"op": e.key, "calls": e.count / steps, "ms": e.self_cpu_time_total / steps / 1e3} for e in events]
    op_ms = sum(row["ms"] for row in table)  # time inside torch ops (self times add up to the top-level ops')
    matmul_ms = sum(row["ms"] for row in table if row["op"] in MATMUL_OPS)
    return {"step_ms": step_ms, "profiled_step_ms": profiled_ms, "op_ms": op_ms, "matmul_ms": matmul_ms,
            "matmul_share": matmul_ms / op_ms if op_ms else 0.0,
            "outside_ops_ms": max(0.0, profiled_ms - op_ms), "fast_path": engine.fast, "table": table[:rows]}


def format_profile(result: dict) -> str:
    lines = [f"{'op':52s} {'calls/step':>10s} {'ms/step':>9s}"]
    lines += [f"{row['op'][:52]:52s} {row['calls']:10.1f} {row['ms']:9.3f}" for row in result["table"]]
    lines.append(f"step {result['step_ms']:.2f} ms unprofiled ({result['profiled_step_ms']:.2f} under the profiler); "
                 f"torch ops {result['op_ms']:.2f} ms of which matmul {result['matmul_ms']:.2f} ms "
                 f"({result['matmul_share']:.0%}), outside torch ops {result['outside_ops_ms']:.2f} ms; "
                 f"fast path: {result['fast_path']}")
    return "\n".join(lines)
