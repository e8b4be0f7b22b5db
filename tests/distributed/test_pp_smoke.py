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
