"""Tensor-parallel (TP=2, 2 processes on CPU) early-exit decoding equals TP=1 decoding.

One torchrun launch of ``_tp_decode_worker.py``: two models (plain exits; exit blocks + MLP on a
RoPE/GQA/SwiGLU backbone) trained at TP=1, loaded at TP=2 from a distributed checkpoint, decode
3 prompts x 7 settings (greedy and seeded sampling, per-exit thresholds, an exit subset, a stop
token, self-speculative) with ``generate``; token ids, exit depths and finish reasons must be equal.
"""
from collections import Counter
from pathlib import Path

import pytest

from tests.distributed.test_pipelined_decode import launch_two

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    result = launch_two(HERE / "_tp_decode_worker.py", tmp_path_factory.mktemp("tp_decode"))
    for name, r in result.items():
        print(f"\n{name}: {r['tokens']} tokens; TP=1 {r['ref_seconds']:.2f} s, TP=2 {r['tp_seconds']:.2f} s")
    return result


@pytest.mark.parametrize("model", ["plain", "block"])
def test_tp2_decoding_equals_tp1(run, model):
    r = run[model]
    # really sharded: 4 heads / 2 query groups / ffn 96 (x2 for SwiGLU) split over 2 ranks
    fc1 = 96 if model == "block" else 48
    assert r["shard"] == [[2, 1 if model == "block" else 2, [fc1, 48]]] * 2
    assert len(r["cases"]) == 7
    for i, case in enumerate(r["cases"]):
        for rank in (0, 1):
            assert r["tp2"][rank][i] == r["reference"][i], f"{model} {case} rank {rank}"
    depths = Counter(d for row in r["tp2"][0] for g in row for d in g["depths"])
    assert set(depths) == {1, 3, 4} and min(depths.values()) >= 5, depths
    assert "stop" in [g["finish"] for g in r["tp2"][0][5]]
