"""Pipeline-parallel early-exit decoding (PP=2, 2 processes on CPU) equals single-stage decoding.

One torchrun launch of ``_pipelined_decode_worker.py`` (see its docstring) decodes 3 prompts x 6
settings x 2 models (plain exits; exits with a transformer block and MLP on a RoPE/GQA/SwiGLU backbone)
with :func:`generate_pipelined` at PP=2 and with ``generate`` (KV recomputation) at PP=1. The tests
compare token ids, exit depths and finish reasons exactly, and check that the run covered tokens
decided on stage 0 (exit after layer 1), on stage 1 (exit after layer 3) and at full depth (layer 4).
"""
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def launch_two(worker: Path, out_dir: Path, timeout: int = 240) -> dict:
    """``worker OUT_DIR`` under torchrun with 2 processes; returns its ``result.json``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(worker), str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return json.loads((out_dir / "result.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    result = launch_two(HERE / "_pipelined_decode_worker.py", tmp_path_factory.mktemp("pipelined"))
    for name, r in result.items():
        print(f"\n{name}: {r['tokens']} tokens; PP=1 generate {r['ref_seconds']:.2f} s "
              f"({r['tokens'] / r['ref_seconds']:.0f} tok/s), PP=2 pipelined {r['pp_seconds']:.2f} s "
              f"({r['tokens'] / r['pp_seconds']:.0f} tok/s); train+save {r['train_seconds']:.1f} s, "
              f"PP=2 build+load {r['load_seconds']:.1f} s")
    return result


@pytest.mark.parametrize("model", ["plain", "block"])
def test_pipelined_equals_single_stage_decoding(run, model):
    r = run[model]
    assert r["stage_exits"] == [[1], [3]]  # one exit on each stage
    assert len(r["cases"]) == 6 and r["tokens"] > 200
    for i, case in enumerate(r["cases"]):
        for rank in (0, 1):  # every rank returns the same Generation
            assert r["pipelined"][rank][i] == r["reference"][i], f"{model} {case} rank {rank}"


@pytest.mark.parametrize("model", ["plain", "block"])
def test_run_covers_every_decision_place(run, model):
    r = run[model]
    depths = Counter(d for row in r["pipelined"][0] for g in row for d in g["depths"])
    assert set(depths) == {1, 3, 4}, depths  # stage 0's exit, stage 1's exit, stage 1's final layer
    assert min(depths.values()) >= 5, depths
    per_case = [Counter(d for g in row for d in g["depths"]) for row in r["pipelined"][0]]
    assert all(len(c) >= 2 for c in per_case[:2]), per_case  # greedy thresholds mix depths within a run
    greedy, sampled = r["pipelined"][0][0], r["pipelined"][0][4]  # same threshold 0.7; sampling differs
    assert [g["tokens"] for g in greedy] != [g["tokens"] for g in sampled]
    assert any(d != 1 for g in sampled for d in g["depths"])  # sampled from logits shipped by stage 1
    stop = r["pipelined"][0][5]
    assert "stop" in [g["finish"] for g in stop] and all(len(g["tokens"]) == 16 or g["finish"] == "stop" for g in stop)


@pytest.mark.parametrize("model", ["plain", "block"])
def test_one_stage_pipeline_is_plain_decoding(run, model):
    r = run[model]
    assert r["pp1_pipelined"] == r["reference"][0]


def test_refusals_before_any_message(run):
    errors = run["plain"]["errors"]  # the run went on afterwards: no rank was left waiting for a message
    assert "'self_speculative' cannot run pipelined" in errors["speculative"]
    assert "the prompt is empty" in errors["empty"]
    assert "rank 0 is pipeline stage 0 of 2 but its model was built with pre_process=True, post_process=True" \
        in errors["layout"]
