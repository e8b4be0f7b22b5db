"""scripts/bench_triton.py end to end on the tiny bigram .nemo: a real tritonserver, started and stopped by it."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_triton.py"
RESULT = re.compile(r"^RESULT triton_vs_inprocess=(\S+) lost_requests=(\d+) p99_latency_8_clients_s=(\S+)$")
READY = re.compile(r"tritonserver pid (\d+) ready")

if not all(__import__("importlib").util.find_spec(m) for m in ("pytriton", "tritonclient")):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the triton extra: pip install -e '.[triton]'")
    pytest.skip("the triton extra is not installed (pip install -e '.[triton]')", allow_module_level=True)


def command(bigram_nemo, tmp_path):
    path, prompts = bigram_nemo
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    return [sys.executable, str(SCRIPT), "--quick", "--nemo", str(path), "--prompts-file", str(prompts_file)]


def environment():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def test_quick_run_result_line(bigram_nemo, tmp_path):
    done = subprocess.run(command(bigram_nemo, tmp_path), cwd=tmp_path, env=environment(), capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    match = RESULT.match(lines[-1])
    assert match, lines[-1]
    ratio, lost, p99 = float(match.group(1)), int(match.group(2)), float(match.group(3))
    assert lost == 0
    assert math.isfinite(ratio) and ratio > 0
    assert math.isfinite(p99) and p99 > 0
    # every concurrency measured on both sides, all 8 answers each time; the server it started is gone
    for clients in (1, 4, 8):
        for side in ("in-process", "triton"):
            assert any(re.search(rf"{clients} client\(s\)\s+{side}: .* 8/8 answers", ln) for ln in lines), (clients, side)
    pid = int(READY.search(done.stdout).group(1))
    assert not alive(pid)
    assert "tritonserver stopped" in done.stdout


def test_ctrl_c_stops_the_server(bigram_nemo, tmp_path):
    # SIGINT back to its default in the child: a shell running this suite in the background starts it ignored,
    # and Python then never turns Ctrl-C into KeyboardInterrupt (the run went on to exit 0)
    proc = subprocess.Popen(command(bigram_nemo, tmp_path), cwd=tmp_path, env=environment(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pid = None
    try:
        deadline = time.monotonic() + 900
        for line in proc.stdout:
            found = READY.search(line)
            if found:
                pid = int(found.group(1))
                break
            assert time.monotonic() < deadline
        assert pid is not None and alive(pid)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest[-2000:]
    assert "interrupted; tritonserver stopped" in rest
    assert not alive(pid)
