"""PP=2 on CPU under torchrun: exits live on their stage and train through megatron's 1F1B schedule."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
HERE = Path(__file__).resolve().parent


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_pp2_exits_on_both_stages(tmp_path):
    out = tmp_path / "result"
    torchrun(HERE / "_pp_smoke_worker.py", str(out))
    r0, r1 = (json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1))
    assert (r0["pre"], r0["post"], r1["pre"], r1["post"]) == (True, False, False, True)
    assert r0["local_exits"] == [0] and r1["local_exits"] == [1]  # exit after layer 1 / after layer 3
    assert r0["losses"] == r1["losses"]  # reduced over the pipeline group: same numbers everywhere
    for key in ("final", "exit0", "exit1"):
        assert math.isfinite(r0["losses"][key]) and 3.5 < r0["losses"][key] < 5.0  # ~ln(64) at init
    assert all(v > 0 for v in r0["exit_grad"].values()) and all(v > 0 for v in r1["exit_grad"].values())
    assert all(v > 0 for v in r0["layer_grad"] + r1["layer_grad"])


def test_tied_exit_on_middle_stage_matches_single_stage_gradients(tmp_path):
    out = tmp_path / "tied"
    torchrun(HERE / "_tied_middle_worker.py", str(out), nproc=3)
    results = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(3)]
    assert [r["local_exits"] for r in results] == [[0], [1], [2]]
    assert [r["middle_copy"] for r in results] == [False, True, False]
    assert results[1]["copied_from_stage0"], "the middle stage's embedding copy was not filled from stage 0"
    for r in results:
        for key, value in r["ref_losses"].items():
            assert r["losses"][key] == pytest.approx(value, rel=1e-5)
        worst = max(r["rel_grad_diff"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, f"rank {r['rank']}: gradient of {worst[0]} differs from PP=1 by {worst[1]:.2e}"
    # the shared embedding gradient (all contributions, all-reduced) is present on all three stages
    assert "embedding.word_embeddings.weight" in results[0]["rel_grad_diff"]
    assert "exit_word_embeddings" in results[1]["rel_grad_diff"]
    assert "output_layer.weight" in results[2]["rel_grad_diff"]


def test_bubble_fill_off_is_bit_identical_and_on_adds_first_stage_exit_gradients(tmp_path):
    out = tmp_path / "fill"
    torchrun(HERE / "_bubble_fill_worker.py", str(out))
    r0, r1 = (json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1))
    assert r0["pre"] and not r1["pre"]
    assert r0["no_fill_identical"] and r1["no_fill_identical"]
    assert r0["fills_run"] == 0 and r1["fills_run"] == 0  # that run had nothing to fill
    # with 2 fill micro-batches: stage 0 gets exactly the fill exits' gradients; on stage 1 only the
    # tied output weight changes (megatron all-reduces the word-embedding gradient from stage 0)
    assert r1["fill_changed"] == ["output_layer.weight"]
    assert r0["fill_changed"] and r0["fill_max_err"] < 1e-6
    assert any(k.startswith("exits.0.") for k in r0["by_hand_nonzero"])
    assert not any(k.startswith("decoder.layers.1.") for k in r0["by_hand_nonzero"])  # after the deepest exit
    assert r0["layer2_calls_in_fill"] == 0  # forward_exits_only stopped after the exit's layer
    assert r0["filled_losses"]["exit0"] == r0["losses"]["exit0"]  # regular micro-batches' losses unchanged
    assert "fill_exit0" in r0["filled_losses"] and "fill_exit1" not in r0["filled_losses"]


def test_bench_bubble_fill_prints_result(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]), NEMO_EE_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, str(HERE.parents[1] / "scripts" / "bench_bubble_fill.py"), "--seconds", "2",
           "--layers", "4", "--hidden", "32", "--seq", "16", "--vocab", "300", "--val-batches", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT exit_progress_ratio=") and "steps_plain=" in last and "steps_fill=" in last
    bad = subprocess.run(cmd[:2] + ["--fill", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "--fill >= 1" in bad.stderr
