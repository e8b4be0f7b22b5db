"""EE-Tuning step 2: exits trained on a frozen backbone (nemo_ee.tuning.ee_tune)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_ee.config import EarlyExitConfig

REPO = Path(__file__).resolve().parents[2]
B, S, V = 2, 12, 64


def cfg(**kw) -> EarlyExitConfig:
    base = dict(num_layers=6, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=V,
                seq_length=S, exit_layer_nums=[2, 3])
    base.update(kw)
    return EarlyExitConfig(**base)


def build(c):
    from nemo_ee.models import build_model

    torch.manual_seed(7)
    return build_model(c)


def batch(seed=0):
    """A learnable pattern: the next token is the current one + 1."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S), generator=g)
    return tokens, (tokens + 1) % V


def backbone_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("exits.") and torch.is_tensor(v)}


@pytest.mark.parametrize("optimizer", ["torch", "megatron"])
def test_backbone_frozen_and_exit_losses_fall(single_process, optimizer):
    from nemo_ee.tuning.ee_tune import EETuner

    model = build(cfg(exit_mlp=True, exit_block=True, exit_loss_weights=[0.5, 1.0], exit_loss_init_weights=[0.1, 1.0],
                      exit_loss_warmup_iters=5))
    before = backbone_state(model)
    exits_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("exits.") and torch.is_tensor(v)}
    tuner = EETuner(model, lr=1e-2, optimizer=optimizer)
    assert tuner.params and all(p.requires_grad for p in tuner.params)
    tokens, labels = batch()
    history = [tuner.step(tokens, labels) for _ in range(20)]
    for i in (0, 1):
        assert history[-1][i] < 0.7 * history[0][i], (i, history[0], history[-1])
    after = backbone_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    for name, p in model.named_parameters():
        if not name.startswith("exits."):
            assert not p.requires_grad and p.grad is None, name
            assert getattr(p, "main_grad", None) is None, name
    changed = [k for k, v in model.state_dict().items() if k in exits_before and not torch.equal(v, exits_before[k])]
    assert changed  # the exits did train


def test_output_layer_and_layers_after_last_exit_never_run(single_process):
    from nemo_ee.tuning.ee_tune import EETuner

    model = build(cfg(exit_layer_nums=[1, 3], exit_block=True))
    calls = {}

    def count(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1
        return hook

    model.output_layer.register_forward_hook(count("output_layer"))
    model.decoder.final_layernorm.register_forward_hook(count("final_layernorm"))
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_pre_hook(count(f"layer{i + 1}"))  # the exit hook raises after layer 3
    for i, head in model.exits.items():
        head.block.register_forward_hook(count(f"exit{i}"))
    tuner = EETuner(model, lr=1e-3)
    tokens, labels = batch()
    for _ in range(2):
        assert set(tuner.step(tokens, labels)) == {0, 1}
    assert calls == {"layer1": 2, "layer2": 2, "layer3": 2, "exit0": 2, "exit1": 2}


def test_frozen_backbone_matches_plain_exit_forward(single_process):
    """Same exit losses and exit gradients as the exits-only forward with grad; no backbone graph."""
    model = build(cfg(exit_block=True, exit_mlp=True))
    tokens, labels = batch()
    pos = torch.arange(S).expand(B, S)
    ref = model.forward_exits_only(tokens, pos, labels)
    sum(v.sum() for v in ref.values()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("exits.")}
    model.zero_grad(set_to_none=True)
    out = model.forward_exits_only(tokens, pos, labels, frozen_backbone=True)
    assert out.keys() == ref.keys()
    for i in out:
        torch.testing.assert_close(out[i], ref[i].detach(), rtol=0, atol=0)
    sum(v.sum() for v in out.values()).backward()
    for n, p in model.named_parameters():
        if n.startswith("exits."):
            torch.testing.assert_close(p.grad, ref_grads[n])
        else:
            assert p.grad is None, n  # backward never reached the backbone


@pytest.mark.parametrize("optimizer", ["torch", "megatron"])
def test_no_exits_is_a_no_op(single_process, optimizer):
    """A model / stage without exits has nothing to train: steps return {} and change nothing."""
    from nemo_ee.tuning.ee_tune import EETuner

    model = build(cfg(exit_layer_nums=[]))
    before = backbone_state(model)
    tuner = EETuner(model, optimizer=optimizer)
    assert not tuner.has_trainable and tuner.optimizer is None
    tokens, labels = batch()
    assert tuner.step(tokens, labels) == {} and tuner.step(tokens, labels) == {}
    assert tuner.iteration == 2
    assert all(torch.equal(v, before[k]) for k, v in backbone_state(model).items())
    assert all(p.grad is None for p in model.parameters())


def test_megatron_optimizer_with_empty_parameter_list(single_process):
    """megatron's optimizer on a DDP model with no trainable parameter steps without error (EE-LLM #12)."""
    from nemo_ee.parallel.optimizer import OptimSettings, build_optimizer, wrap_ddp
    from nemo_ee.tuning.ee_tune import freeze_backbone

    model = build(cfg(exit_layer_nums=[]))
    assert freeze_backbone(model) == []
    opt = build_optimizer(wrap_ddp(model), OptimSettings(), 10)
    opt.zero_grad()
    opt.step()
    assert sum(len(g["params"]) for g in opt.param_groups) == 0


def test_truncated_model_loads_and_matches_full(single_process):
    from nemo_ee.tuning.ee_tune import EETuner, build_truncated_model, truncated_config

    full_cfg = cfg(exit_layer_nums=[2, 3], exit_mlp=True)
    full = build(full_cfg)
    small = build_truncated_model(full_cfg, full.state_dict())
    assert truncated_config(full_cfg).num_layers == 3 and len(small.decoder.layers) == 3
    assert not hasattr(small, "output_layer") or small.output_layer is None
    assert not any(k.startswith("output_layer") or "final_layernorm" in k for k in small.state_dict())
    tokens, labels = batch()
    pos = torch.arange(S).expand(B, S)
    with torch.no_grad():
        ref = full.forward_exits_only(tokens, pos, labels)
        got = small.forward_exits_only(tokens, pos, labels)
    for i in ref:
        torch.testing.assert_close(got[i], ref[i], rtol=0, atol=0)
    tuner = EETuner(small, lr=1e-2)
    first = tuner.step(tokens, labels)
    for _ in range(9):
        last = tuner.step(tokens, labels)
    assert all(last[i] < first[i] for i in first)
    with pytest.raises(ValueError, match="no exits"):
        truncated_config(cfg(exit_layer_nums=[]))


def test_bench_tuning_script_tiny():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_tuning.py"), "--layers", "4", "--hidden", "64",
         "--heads", "4", "--seq", "32", "--vocab", "256", "--repeats", "1", "--warmup", "1"],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    parts = last.split()
    assert parts[0] == "RESULT" and [p.split("=")[0] for p in parts[1:]] == [
        "time_ratio", "predicted_time_ratio", "memory_ratio"]
    values = [float(p.split("=")[1]) for p in parts[1:]]
    assert all(v > 0 for v in values)


@pytest.fixture(scope="module")
def exits_nemo(tmp_path_factory):
    """A tiny .nemo with exits at layers 1 and 2 (of 4), as add_exits writes it."""
    from nemo_ee.data import CorpusSpec, train_tokenizer
    from nemo_ee.tuning import add_exits
    from tests.tuning.test_add_exits import saved

    tmp = tmp_path_factory.mktemp("ee_tune")
    tok = str(train_tokenizer(CorpusSpec(max_files=5), 300, tmp / "tok"))
    _, src = saved(tmp, tok)
    new = add_exits(src, [1, 2], exit_loss_weights=[0.5, 1.0], init="random")
    path = tmp / "ee.nemo"
    new.save_to(str(path))
    return path


def _cfg(src, out, **kw):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf" / "ee_tuning.yaml")
    cfg.restore_from, cfg.output = str(src), str(out)
    cfg.data.max_files = 5
    cfg.update(kw)
    return cfg


def test_tune_nemo_trains_exits_on_real_data(single_process, exits_nemo, tmp_path):
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel
    from nemo_ee.tuning.ee_tune import tune_nemo

    out = tmp_path / "tuned.nemo"
    result = tune_nemo(_cfg(exits_nemo, out, max_steps=15, micro_batch_size=4, optim={"lr": 1e-2, "weight_decay": 0.0,
                                                                                        "clip_grad": 1.0}))
    assert all(result["last"][i] < result["first"][i] for i in (0, 1)), result
    src = EarlyExitGPTNeMoModel.restore_from(str(exits_nemo), map_location="cpu").model.state_dict()
    got = EarlyExitGPTNeMoModel.restore_from(str(out), map_location="cpu").model.state_dict()
    assert src.keys() == got.keys()
    for k in src:
        if torch.is_tensor(src[k]) and not k.startswith("exits."):
            assert torch.equal(src[k], got[k]), k  # backbone bit-identical
    assert any(not torch.equal(src[k], got[k]) for k in src if k.startswith("exits.") and torch.is_tensor(src[k]))
    with pytest.raises(FileExistsError):
        tune_nemo(_cfg(exits_nemo, out, max_steps=1))


def test_ee_tune_script_hydra(exits_nemo, tmp_path):
    out = tmp_path / "tuned.nemo"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ee_tune.py"), f"restore_from={exits_nemo}", f"output={out}",
         "max_steps=2", "micro_batch_size=2", "data.max_files=5", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 2/2: exit_l1=" in run.stdout and out.is_file()


def test_tied_exits_and_exit_at_the_stage_input(single_process):
    """Tied exits train only their norm (the shared embedding stays frozen); an exit reading the first layer's
    input (pre, layer 1) stops the backbone before any layer runs."""
    from nemo_ee.tuning.ee_tune import EETuner

    model = build(cfg(exit_layer_nums=[1], exit_position="pre", tie_exit_output=True))
    before = backbone_state(model)
    ran = []
    for layer in model.decoder.layers:
        layer.self_attention.register_forward_pre_hook(lambda *_: ran.append(1))
    model.output_layer.register_forward_pre_hook(lambda *_: ran.append(2))
    tuner = EETuner(model, lr=1e-2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"exits.0.norm.weight", "exits.0.norm.bias"}
    tokens, labels = batch()
    assert set(tuner.step(tokens, labels)) == {0}
    assert ran == []  # no layer, no output layer
    assert all(torch.equal(v, before[k]) for k, v in backbone_state(model).items())


@pytest.mark.parametrize("kw, match", [
    ({"pipeline_model_parallel_size": 2}, r"the world size is 1 but pipeline_model_parallel_size=2 \(launch with "
                                          r"torchrun --nproc_per_node 2\)"),
    ({"pipeline_model_parallel_size": 3}, r"pipeline_model_parallel_size=3 must divide the 2 layers up to the last "
                                          r"exit \(layer 2\); allowed: \[1, 2\]"),
    ({"pipeline_model_parallel_size": 0}, r"pipeline_model_parallel_size=0 must be an integer >= 1"),
    ({"pipeline_model_parallel_size": 2, "optimizer": "megatron"}, r"optimizer='megatron': with "
                                                                     r"pipeline_model_parallel_size > 1 only 'torch'"),
    ({"num_microbatches": 2}, r"num_microbatches=2 needs pipeline_model_parallel_size > 1"),
])
def test_tune_nemo_rejects_bad_pipeline_settings(single_process, exits_nemo, tmp_path, kw, match):
    from nemo_ee.tuning.ee_tune import tune_nemo

    out = tmp_path / "tuned.nemo"
    with pytest.raises(ValueError, match=match):
        tune_nemo(_cfg(exits_nemo, out, **kw))
    assert not out.exists()
