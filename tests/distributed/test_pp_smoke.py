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
