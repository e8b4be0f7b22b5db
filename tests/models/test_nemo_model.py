"""The NeMo model end to end: training through Lightning + megatron schedules, .nemo round trip, resume."""
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def recipe(tmp_path: Path, max_steps: int, **arch) -> "OmegaConf":
    cfg = OmegaConf.load(REPO / "conf" / "ee_gpt_tiny.yaml")
    cfg.trainer.max_steps = max_steps
    cfg.trainer.val_check_interval = max_steps
    cfg.trainer.limit_val_batches = 2
    cfg.trainer.enable_progress_bar = False
    cfg.exp_manager.exp_dir = str(tmp_path / "exp")
    cfg.exp_manager.checkpoint_callback_params.every_n_train_steps = max_steps
    cfg.model.micro_batch_size = 4
    cfg.model.global_batch_size = 8
    cfg.model.tokenizer.vocab_size = 512
    cfg.model.tokenizer.cache_dir = str(tmp_path.parent / "cache")
    cfg.model.data.max_files = 40
    cfg.model.optim.warmup_steps = 2
    cfg.model.optim.decay_steps = 100  # the LR schedule must not depend on where a run stops
    cfg.model.arch.update(dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                               seq_length=32, exit_layer_nums=[1, 2], exit_loss_weights=[0.25, 0.5]))
    cfg.model.arch.update(arch)
    return cfg


class LossLog(Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(dict(pl_module.last_train_losses))


def run(cfg, log=None):
    from nemo_ee.train import make_trainer, pretrain

    return pretrain(cfg, trainer=make_trainer(cfg, callbacks=[log] if log else None))


def test_training_lowers_every_exit_loss_and_nemo_round_trip(tmp_path, capsys):
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    log = LossLog()
    model = run(recipe(tmp_path, 30), log)
    first, last = log.steps[0], log.steps[-1]
    assert len(log.steps) == 30
    for key in ("final", "exit0", "exit1"):
        assert last[key] < first[key] - 0.5, (key, first[key], last[key])
    assert set(model.last_val_losses) == {"final", "exit_l1", "exit_l2"}
    printed = capsys.readouterr().out
    assert "validation loss per exit:" in printed and "exit_l1" in printed

    tb = list((tmp_path / "exp").rglob("events.out.tfevents*"))
    assert tb, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb[0].parent)); acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_exit_l1_loss", "train_exit_l2_loss", "exit_l1_weight", "val_exit_l1_loss", "val_loss"} <= tags

    path = tmp_path / "m.nemo"
    model.save_to(str(path))
    restored = EarlyExitGPTNeMoModel.restore_from(str(path), map_location="cpu")
    tokens = torch.tensor([model.tokenizer.encode("def f(x):\n    return x + 1\n" * 3)[:32]])
    model.eval(); restored.eval()
    with torch.no_grad():
        a, b = model(tokens), restored(tokens)
    assert torch.equal(a.output, b.output)
    assert all(torch.equal(a.exits[i], b.exits[i]) for i in (0, 1))
    assert restored.tokenizer.encode("import os") == model.tokenizer.encode("import os")
    assert restored.ee_config == model.ee_config


def test_resume_continues_the_same_loss_curve(tmp_path):
    straight = LossLog()
    run(recipe(tmp_path / "a", 8), straight)

    part1, part2 = LossLog(), LossLog()
    run(recipe(tmp_path / "b", 4), part1)
    run(recipe(tmp_path / "b", 8), part2)  # same exp dir: exp_manager resumes from the last checkpoint
    assert len(part1.steps) == 4 and len(part2.steps) == 4
    resumed = part1.steps + part2.steps
    for s, r in zip(straight.steps, resumed):
        for key in s:
            assert r[key] == pytest.approx(s[key], rel=1e-6, abs=1e-6), (key, s[key], r[key])


def test_resume_checkpoint_loader_refuses_pickled_code(tmp_path):
    import os

    from nemo_ee.checkpoint.safe_io import SafeTorchCheckpointIO

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, bad)
    with pytest.raises(Exception, match="Weights only load failed"):
        SafeTorchCheckpointIO().load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SafeTorchCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")
