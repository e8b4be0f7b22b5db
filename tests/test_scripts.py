"""The entry points as a user runs them: Hydra overrides, bad input, the benchmark's RESULT line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "model.micro_batch_size=2", "model.global_batch_size=4",
    "model.data.max_files=20", "model.tokenizer.vocab_size=384", "model.arch.num_layers=4",
    "model.arch.hidden_size=32", "model.arch.num_attention_heads=4", "model.arch.ffn_hidden_size=64",
    "model.arch.seq_length=16", "model.arch.exit_layer_nums=[1,3]",
]


def run_script(name, args, tmp_path, timeout=600):
    env = dict(os.environ, NEMO_EE_CACHE=str(tmp_path / "cache"), NEMO_EE_EXP_DIR=str(tmp_path / "exp"),
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_pretrain_script_takes_hydra_overrides(tmp_path):
    proc = run_script("pretrain.py", TINY, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    start = lines.index("validation loss per exit:")
    table = lines[start + 1:start + 4]
    assert [row.split()[0] for row in table] == ["exit_l1", "exit_l3", "final"]
    assert all(0 < float(row.split()[1]) < 10 for row in table)
    assert list((tmp_path / "exp").rglob("*.nemo")), "no .nemo written at the end of training"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.arch.exit_layer_nums=[2,99]", "exit layer 99 is outside 1..4"),
        ("model.arch.exit_loss_weights=[0.1,0.2,0.3]", "exit_loss_weights has 3 entries but there are 2 exits"),
        ("model.global_batch_size=3", "global_batch_size=3 must be a positive multiple of micro_batch_size=2"),
        ("+model.arch.no_such_key=1", "unknown EarlyExitConfig key"),
    ],
)
def test_pretrain_rejects_bad_config_before_any_work(tmp_path, override, message):
    proc = run_script("pretrain.py", TINY + [override], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "exp").exists(), "experiment directory created before the config was validated"
    assert not (tmp_path / "cache").exists(), "tokenizer trained before the config was validated"


def test_bench_train_overhead_prints_result_line(tmp_path):
    proc = run_script("bench_train_overhead.py", ["--repeats", "1", "--warmup", "0"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT measured_ratio=") and " predicted_ratio=" in last
    predicted = float(last.split("predicted_ratio=")[1])
    assert 1.1 < predicted < 1.5  # two untied exit projections on an 8-layer, vocab-4096 backbone
    bad = run_script("bench_train_overhead.py", ["--repeats", "0"], tmp_path, timeout=120)
    assert bad.returncode == 2 and "--repeats must be >= 1" in bad.stderr
