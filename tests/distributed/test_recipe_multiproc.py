"""The pretraining recipe on 2 processes under torchrun: PP=2, TP=2 and DP=2 train, log, checkpoint, resume.

Every launch is the user's command (``torchrun --nproc_per_node 2 scripts/pretrain.py ...``) with a
tiny model. Per-step losses are read back from the TensorBoard events the run wrote.
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
STEPS, HALF = 6, 3
TINY = [
    f"trainer.val_check_interval={HALF}", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "model.micro_batch_size=2", "model.global_batch_size=4",
    "model.data.max_files=20", "model.tokenizer.vocab_size=384", "model.arch.num_layers=4",
    "model.arch.hidden_size=32", "model.arch.num_attention_heads=4", "model.arch.ffn_hidden_size=64",
    "model.arch.seq_length=16", "model.arch.exit_layer_nums=[1,3]", "model.optim.warmup_steps=1",
    "+model.optim.decay_steps=100",  # the LR schedule must not depend on where a run stops
    f"exp_manager.checkpoint_callback_params.every_n_train_steps={HALF}",
    "+exp_manager.seconds_to_sleep=0.5",  # exp_manager parks ranks > 0 for 5 s by default
]
PP2 = ["model.arch.pipeline_model_parallel_size=2"]
TP2 = ["model.arch.tensor_model_parallel_size=2"]
EXIT_TAGS = {"train_exit_l1_loss", "train_exit_l3_loss", "val_exit_l1_loss", "val_exit_l3_loss", "val_loss"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(root: Path, exp: str, overrides: list, max_steps: int, nproc: int = 2) -> str:
    """Run the recipe (under torchrun when nproc > 1) in experiment dir root/exp; its stdout."""
    env = dict(os.environ, NEMO_EE_CACHE=str(root / "cache"), NEMO_EE_EXP_DIR=str(root / exp),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    script = [str(REPO / "scripts" / "pretrain.py"), *TINY, *overrides, f"trainer.max_steps={max_steps}"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_port()}", *script]
    else:
        cmd = [sys.executable, *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=root)
    out = proc.stdout + proc.stderr
    log = root / f"{exp}-{max_steps}.log"
    log.write_text(out)
    if proc.returncode:
        workers = out.split("closing signal SIGTERM")[0]  # what the workers said before torchrun gave up
        lines = [line for line in workers.splitlines() if line.strip() and not re.search(r"NeMo W|warn", line)]
        shown = "\n".join(lines[-80:])
        pytest.fail(f"{' '.join(cmd)} failed (full log: {log}):\n{shown}")
    return out


def events(exp_dir: Path) -> dict:
    """{tag: {step: value}} over every TensorBoard event file of the experiment, and the writer pids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, pids = {}, set()
    for path in sorted(exp_dir.rglob("events.out.tfevents*")):
        pids.add(path.name.split(".")[-2])
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {"scalars": scalars, "pids": pids}


def train_curve(ev: dict) -> list:
    """Per training step: (final, exit after layer 1, exit after layer 3) loss."""
    s = ev["scalars"]
    steps = sorted(s["train_loss"])
    return [(s["train_loss"][k], s["train_exit_l1_loss"][k], s["train_exit_l3_loss"][k]) for k in steps]


def last_checkpoint(exp_dir: Path) -> Path:
    found = [p for p in (exp_dir / "ee_gpt_tiny" / "checkpoints").iterdir() if p.is_dir() and p.name.endswith("-last")]
    assert len(found) == 1, found
    return found[0]


def trainer_state(ckpt: Path) -> dict:
    from nemo_ee.checkpoint.safe_io import SafeTorchCheckpointIO

    return SafeTorchCheckpointIO().load_checkpoint(ckpt / "trainer.ckpt")


def assert_curves_close(a: list, b: list, rel: float) -> None:
    assert len(a) == len(b), (len(a), len(b))
    for step, (x, y) in enumerate(zip(a, b)):
        assert x == pytest.approx(y, rel=rel, abs=rel), (step, x, y)


def check_run_outputs(out: str, exp_dir: Path, launches: int) -> None:
    assert out.count("validation loss per exit:") == launches, "the per-exit table is printed by rank 0 only"
    table = out[out.rindex("validation loss per exit:"):].splitlines()[1:4]
    assert [row.split()[0] for row in table] == ["exit_l1", "exit_l3", "final"]
    ev = events(exp_dir)
    assert EXIT_TAGS <= set(ev["scalars"]), sorted(ev["scalars"])
    assert len(ev["pids"]) == launches, f"TensorBoard written by {ev['pids']}: only global rank 0 writes"
    ckpt = last_checkpoint(exp_dir)
    assert (ckpt / "model" / "metadata.json").is_file() and (ckpt / "trainer.ckpt").is_file()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("recipe")


@pytest.fixture(scope="module")
def single(root):
    """The same recipe in one process: the reference curve (TP and DP initialise exactly like it)."""
    launch(root, "single", [], STEPS, nproc=1)
    return train_curve(events(root / "single"))


@pytest.fixture(scope="module")
def pp_runs(root):
    straight = launch(root, "pp_straight", PP2, STEPS)
    first = launch(root, "pp_resumed", PP2, HALF)
    second = launch(root, "pp_resumed", PP2, STEPS)
    return straight, first + second


def test_pp2_trains_logs_checkpoints_and_resumes_on_the_same_curve(root, pp_runs):
    straight_out, resumed_out = pp_runs
    check_run_outputs(straight_out, root / "pp_straight", 1)
    check_run_outputs(resumed_out, root / "pp_resumed", 2)
    assert "Resuming training from checkpoint" in resumed_out
    assert not list(root.glob("pp_*/**/*.nemo")), "a .nemo of one pipeline stage would be a broken model"
    state = trainer_state(last_checkpoint(root / "pp_resumed"))
    assert state["global_step"] == STEPS
    straight, resumed = train_curve(events(root / "pp_straight")), train_curve(events(root / "pp_resumed"))
    assert len(straight) == STEPS
    assert_curves_close(resumed, straight, rel=1e-6)  # same layout: the resumed half continues exactly
    assert straight[-1][0] < straight[0][0] - 0.05, "the final loss goes down"


def test_tp2_resumes_and_matches_the_single_process_curve(root, single):
    out = launch(root, "tp", TP2, HALF) + launch(root, "tp", TP2, STEPS)
    check_run_outputs(out, root / "tp", 2)
    assert "Resuming training from checkpoint" in out
    assert trainer_state(last_checkpoint(root / "tp"))["global_step"] == STEPS
    # use_cpu_initialization: megatron initialises each full weight, then keeps this rank's slice, so
    # TP=2 starts from the single-process weights; only the reduction order of the split matmuls differs.
    assert_curves_close(train_curve(events(root / "tp")), single, rel=1e-6)


def test_dp2_matches_the_single_process_curve_and_exports_nemo(root, single):
    out = launch(root, "dp", [], STEPS)  # 2 processes, TP = PP = 1: data parallel 2
    check_run_outputs(out, root / "dp", 1)
    assert list((root / "dp").rglob("*.nemo")), "DP rank 0 holds the whole model: the .nemo is exported"
    assert_curves_close(train_curve(events(root / "dp")), single, rel=1e-6)


def test_pp2_curve_vs_single_process(root, pp_runs, single):
    """PP=2 does not start from the single-process weights (each stage seeds its own layers), so the
    curves agree only loosely: same data, same schedule, a different random initialisation."""
    straight = train_curve(events(root / "pp_straight"))
    assert_curves_close([s[0:1] for s in straight], [s[0:1] for s in single], rel=0.02)


def test_pp2_bubble_fill_switch_trains_the_first_stage_exits(root):
    out = launch(root, "pp_fill", PP2 + ["model.bubble_fill_microbatches=1", "model.arch.exit_layer_nums=[1,2]",
                                         "model.arch.exit_loss_weights=[0.25,0.5]"], HALF)
    assert "validation loss per exit:" in out
    tags = set(events(root / "pp_fill")["scalars"])
    # both exits live on stage 0, so both get fill micro-batches; their losses are logged apart
    assert {"train_fill_exit_l1_loss", "train_fill_exit_l2_loss", "train_exit_l1_loss"} <= tags, sorted(tags)


def test_bench_pipeline_comm_exits_add_no_p2p_messages(tmp_path):
    """scripts/bench_pipeline_comm.py launches itself under torchrun (PP=2) and counts megatron's messages."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_pipeline_comm.py"), "--tiny", "--repeats", "2",
                           "--warmup", "1"], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    match = re.fullmatch(r"RESULT p2p_messages_with_exits=(\d+) p2p_messages_without_exits=(\d+) "
                         r"step_time_ratio=(\d+\.\d+)", lines[-1])
    assert match, lines[-1]
    n, m, ratio = int(match[1]), int(match[2]), float(match[3])
    assert n == m == 4  # 2 micro-batches: 2 activations forward + 2 gradients back, exits or not
    assert ratio > 0
    sizes = re.search(r"p2p_bytes_with_exits=(\d+) p2p_bytes_without_exits=(\d+)", proc.stdout)
    assert sizes and sizes[1] == sizes[2] == str(4 * 16 * 2 * 32 * 4)  # [seq 16, micro 2, hidden 32] fp32
    assert "[1] on stage 0, [3] on stage 1" in proc.stdout


def test_trainer_devices_follow_torchrun(monkeypatch):
    """torchrun owns the process count: devices / num_nodes come from it; a contradicting recipe is an error."""
    from omegaconf import OmegaConf

    from nemo_ee.parallel.strategy import MegatronStrategy, configure_trainer_settings

    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert configure_trainer_settings({"devices": 1}) == {"devices": 1}
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        configure_trainer_settings({"devices": 2})
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    model_cfg = OmegaConf.create({"seed": 7, "arch": {"pipeline_model_parallel_size": 2}})
    settings = configure_trainer_settings({"devices": 1, "num_nodes": 1}, model_cfg)
    assert (settings["devices"], settings["num_nodes"]) == (2, 2)
    strategy = settings["strategy"]
    assert isinstance(strategy, MegatronStrategy)
    assert (strategy.tensor_model_parallel_size, strategy.pipeline_model_parallel_size, strategy.seed) == (1, 2, 7)
    assert configure_trainer_settings({"devices": 2}, model_cfg)["devices"] == 2
    with pytest.raises(ValueError, match="trainer.devices=8 does not match the torchrun launch"):
        configure_trainer_settings({"devices": 8}, model_cfg)
