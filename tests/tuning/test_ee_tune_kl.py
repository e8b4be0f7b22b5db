"""EE-Tuning options: loss=kl (distillation from the final layer), the tuning seq_length, the progress bar / log."""
import re

import pytest
import torch
import torch.nn.functional as F

from nemo_ee.config import EarlyExitConfig
from tests.tuning.test_ee_tune import _cfg, backbone_state, exits_nemo  # noqa: F401  (module fixture)

B, S, V = 2, 12, 64


def cfg(**kw) -> EarlyExitConfig:
    base = dict(num_layers=6, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=V,
                seq_length=S, exit_layer_nums=[2, 3], share_embeddings_and_output_weights=False)
    base.update(kw)
    return EarlyExitConfig(**base)


def build(c, sharpen=8.0):
    """A tiny model whose final layer is confident (a random init gives near-uniform logits)."""
    from nemo_ee.models import build_model

    torch.manual_seed(7)
    model = build_model(c)
    with torch.no_grad():
        (model.shared_embedding_or_output_weight() if c.share_embeddings_and_output_weights
         else model.output_layer.weight).mul_(sharpen)
    return model


def tokens_of(seed, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, S), generator=g)


def positions(tokens):
    return torch.arange(tokens.shape[1]).expand_as(tokens)


def reference_kl(model, tokens, temperature):
    """Per-exit, per-token T^2 KL(p_final || p_exit) by torch.nn.functional.kl_div on the model's own forward."""
    with torch.no_grad():
        out = model(tokens, positions(tokens), None)
    teacher = F.log_softmax(out.output.float() / temperature, dim=-1)
    return {i: F.kl_div(F.log_softmax(e.float() / temperature, dim=-1), teacher, reduction="none",
                        log_target=True).sum(-1) * temperature ** 2 for i, e in out.exits.items()}


@pytest.mark.parametrize("temperature, arch", [
    (1.0, dict(exit_mlp=True)), (2.0, dict(exit_mlp=True)),
    (1.0, dict(exit_block=True, share_embeddings_and_output_weights=True, tie_exit_output=True)),  # shared weight
])
def test_kl_loss_is_kl_div_and_reaches_only_the_exits(single_process, temperature, arch):
    from nemo_ee.tuning.ee_tune import exit_distillation_loss, freeze_backbone

    model = build(cfg(**arch))
    if model.ee_config.tie_exit_output:
        freeze_backbone(model)  # tied exits project with the word embedding: frozen as the tuner freezes it
    tokens = tokens_of(0)
    mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    weights = [0.5, 1.0]
    ref = reference_kl(model, tokens, temperature)
    total, means = exit_distillation_loss(model, tokens, mask, weights, positions(tokens), temperature)
    n = mask.sum()
    expected = sum(weights[i] * (ref[i] * mask).sum() / n for i in ref)
    assert means.keys() == {0, 1}
    # sum p log p - sum p log q in fp32: an absolute error of ~1e-7 against kl_div's sum p (log p - log q)
    for i in ref:
        assert means[i] == pytest.approx(float((ref[i] * mask).sum() / n), rel=1e-5, abs=1e-6)
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5, abs=1e-6) and float(total.detach()) > 0
    total.backward()
    grads = {}
    for name, p in model.named_parameters():
        if name.startswith("exits."):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
            grads[name] = p.grad.clone()
        else:
            assert p.grad is None, name  # no backbone graph at all
    # backward=True (what the tuner does: one exit back-propagated at a time) gives the same gradients
    model.zero_grad(set_to_none=True)
    total2, means2 = exit_distillation_loss(model, tokens, mask, weights, positions(tokens), temperature, backward=True)
    assert not total2.requires_grad and means2 == means
    assert float(total2) == pytest.approx(float(total.detach()), rel=1e-6)
    for name, p in model.named_parameters():
        if name.startswith("exits."):
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)
        else:
            assert p.grad is None, name


def test_kl_runs_the_whole_backbone(single_process):
    from nemo_ee.tuning.ee_tune import EETuner

    model = build(cfg(exit_layer_nums=[1, 3]))
    calls = {}
    for name, mod in [("output_layer", model.output_layer), ("final_layernorm", model.decoder.final_layernorm),
                      *[(f"layer{i + 1}", layer) for i, layer in enumerate(model.decoder.layers)]]:
        mod.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    EETuner(model, loss="kl").step(tokens_of(0), None)
    assert calls == {"output_layer": 1, "final_layernorm": 1, **{f"layer{i}": 1 for i in range(1, 7)}}


@pytest.mark.parametrize("optimizer", ["torch", "megatron"])
def test_kl_tuning_moves_the_exits_to_the_final_layer(single_process, optimizer):
    """Training on some batches lowers the KL to the final layer and raises top-1 agreement on held-out tokens;
    the backbone stays bit-identical and gets no gradient (megatron's DDP: one backward per exit, one step)."""
    from nemo_ee.tuning.ee_tune import EETuner

    model = build(cfg(exit_mlp=True))
    before = backbone_state(model)
    held_out = tokens_of(1000, batch=8)

    def measure():
        kl = {i: float(v.mean()) for i, v in reference_kl(model, held_out, 1.0).items()}
        with torch.no_grad():
            out = model(held_out, positions(held_out), None)
        top = out.output.argmax(-1)
        return kl, {i: float((e.argmax(-1) == top).float().mean()) for i, e in out.exits.items()}

    kl0, agree0 = measure()
    tuner = EETuner(model, lr=1e-2, loss="kl", optimizer=optimizer)
    history = [tuner.step(tokens_of(step), None) for step in range(60)]
    kl1, agree1 = measure()
    # measured: held-out KL 0.38 -> 0.039 (both exits), top-1 agreement 0.0 -> 0.66 / 0.68
    for i in (0, 1):
        assert kl0[i] > 0.3 and history[-1][i] < 0.2 * history[0][i], (i, kl0, history[0], history[-1])
        assert kl1[i] < 0.15 * kl0[i], (i, kl0, kl1)  # held-out KL to the final layer: more than 6x lower
        assert agree0[i] < 0.05 and agree1[i] > 0.5, (i, agree0, agree1)  # top-1 agreement with the final layer
    assert all(torch.equal(v, before[k]) for k, v in backbone_state(model).items())
    for name, p in model.named_parameters():
        if not name.startswith("exits."):
            assert p.grad is None and getattr(p, "main_grad", None) is None, name


def test_kl_keeps_exit_temperature_and_dynamic_token_weights(single_process):
    """The per-exit training temperature divides the exit logits and dynamic weights scale each token's KL by the
    exit's (detached) max probability, as with ce."""
    from nemo_ee.tuning.ee_tune import exit_distillation_loss

    model = build(cfg(exit_logit_temperature=[2.0, 1.0], exit_dynamic_token_weight=[False, True]))
    tokens = tokens_of(0)
    with torch.no_grad():
        out = model(tokens, positions(tokens), None)
    teacher = F.log_softmax(out.output.float(), -1)
    e0, e1 = out.exits[0] / 2.0, out.exits[1]
    kl0 = F.kl_div(F.log_softmax(e0, -1), teacher, reduction="none", log_target=True).sum(-1)
    kl1 = F.kl_div(F.log_softmax(e1, -1), teacher, reduction="none", log_target=True).sum(-1)
    kl1 = kl1 * torch.softmax(e1, -1).max(-1).values
    model.train()
    _, means = exit_distillation_loss(model, tokens, None, [1.0, 1.0], positions(tokens))
    assert means[0] == pytest.approx(float(kl0.mean()), rel=1e-5)
    assert means[1] == pytest.approx(float(kl1.mean()), rel=1e-5)


def test_kl_refuses_a_truncated_model_and_bad_settings(single_process):
    from nemo_ee.tuning.ee_tune import EETuner, build_truncated_model

    c = cfg()
    small = build_truncated_model(c, build(c).state_dict())
    with pytest.raises(ValueError, match=r"loss='kl' distils the final layer: it needs the full model .*"
                                         r"build_truncated_model"):
        EETuner(small, loss="kl")
    EETuner(small, loss="ce")  # the ce fast path: the backbone ends at the last exit
    with pytest.raises(ValueError, match=r"loss='mse' is not one of \['ce', 'kl'\]"):
        EETuner(build(c), loss="mse")
    for bad in (0, -1.0, float("inf"), "2", True):
        with pytest.raises(ValueError, match=re.escape(f"kl_temperature={bad!r} must be a finite number > 0")):
            EETuner(build(c), loss="kl", kl_temperature=bad)


# ------------------------------------------------------------------------------------------ the .nemo driver
@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the driver restores the model or builds the data (the checks must come first)."""
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    def refuse(*_a, **_k):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(EarlyExitGPTNeMoModel, "restore_from", refuse)
    monkeypatch.setattr("nemo_ee.data.build_datasets", refuse)


@pytest.mark.parametrize("bad", [0, 1, 17, 8.5, "8", True])
@pytest.mark.parametrize("pp", [1, 2])
def test_bad_seq_length_fails_before_any_work(single_process, exits_nemo, tmp_path, no_work, bad, pp):
    from nemo_ee.tuning.ee_tune import tune_nemo

    out = tmp_path / "tuned.nemo"
    with pytest.raises(ValueError, match=re.escape(f"seq_length={bad!r} must be null (the model's seq_length, 16) "
                                                   "or an integer in [2, 16]")):
        tune_nemo(_cfg(exits_nemo, out, seq_length=bad, pipeline_model_parallel_size=pp))
    assert not out.exists()


@pytest.mark.parametrize("kw, match", [
    ({"loss": "kl", "pipeline_model_parallel_size": 2}, r"loss=kl needs pipeline_model_parallel_size=1 \(got 2\)"),
    ({"loss": "mse"}, r"loss='mse' is not one of \['ce', 'kl'\]"),
    ({"loss": "kl", "kl_temperature": 0.0}, r"kl_temperature=0.0 must be a finite number > 0"),
    ({"loss": "ce", "kl_temperature": -1}, r"kl_temperature=-1 must be a finite number > 0"),
])
def test_bad_loss_settings_fail_before_any_work(single_process, exits_nemo, tmp_path, no_work, kw, match):
    from nemo_ee.tuning.ee_tune import tune_nemo

    out = tmp_path / "tuned.nemo"
    with pytest.raises(ValueError, match=match):
        tune_nemo(_cfg(exits_nemo, out, **kw))
    assert not out.exists()


def test_pipeline_tuner_refuses_kl_directly(exits_nemo, tmp_path):
    from nemo_ee.tuning.nemo_pipeline import tune_nemo_pipeline

    with pytest.raises(ValueError, match=r"loss='kl' needs the final layer, which the pipeline tuner does not build"):
        tune_nemo_pipeline(_cfg(exits_nemo, tmp_path / "t.nemo", loss="kl"))


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_tune_nemo_windows_loss_log_and_progress_bar(single_process, exits_nemo, tmp_path, capsys, monkeypatch, loss):
    """seq_length=8 on a seq_length-16 model: every step sees [micro_batch, 8] windows; the log lines name the loss
    and parse with the loss_curves stage's parser; a tqdm bar is drawn on stderr."""
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel
    from nemo_ee.pipeline.curves import tuning_curves
    from nemo_ee.tuning.ee_tune import EETuner, tune_nemo

    shapes, step = [], EETuner.step

    def recording(self, tokens, labels, *args, **kw):
        shapes.append((tuple(tokens.shape), tuple(labels.shape)))
        return step(self, tokens, labels, *args, **kw)

    monkeypatch.setattr(EETuner, "step", recording)
    out = tmp_path / "tuned.nemo"
    result = tune_nemo(_cfg(exits_nemo, out, max_steps=6, micro_batch_size=3, seq_length=8, loss=loss,
                            log_every_n_steps=2, optim={"lr": 1e-2, "weight_decay": 0.0, "clip_grad": 1.0}))
    assert shapes == [((3, 8), (3, 8))] * 6
    assert result["seq_length"] == 8 and result["loss"] == loss and result["steps"] == 6
    if loss == "ce":
        assert all(result["last"][i] < result["first"][i] for i in (0, 1)), result
    else:  # this model's final layer is near-uniform: exit 1 starts at KL 4e-4 (lr 1e-2 overshoots it), exit 2 at 1e-2
        assert all(v >= 0 for v in result["last"].values())
        assert sum(result["last"].values()) < 0.5 * sum(result["first"].values()), result
    captured = capsys.readouterr()
    label = "ce" if loss == "ce" else "kl to final, T=1"
    lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1/6", "step 3/6", "step 5/6", "step 6/6"]
    assert all(re.fullmatch(rf"step \d/6: exit_l1=\d+\.\d{{4}} exit_l2=\d+\.\d{{4}} \({label}\)", l) for l in lines)
    log = tmp_path / "tune.log"
    log.write_text(captured.out)
    curves = tuning_curves(log)
    assert sorted(curves) == ["exit at layer 1", "exit at layer 2"]
    assert [s for s, _ in curves["exit at layer 1"]] == [1.0, 3.0, 5.0, 6.0]
    assert curves["exit at layer 2"][-1][1] == pytest.approx(result["last"][1], abs=1e-4)
    assert f"EE-Tuning ({label})" in captured.err and "6/6" in captured.err
    src = EarlyExitGPTNeMoModel.restore_from(str(exits_nemo), map_location="cpu").model.state_dict()
    got = EarlyExitGPTNeMoModel.restore_from(str(out), map_location="cpu").model.state_dict()
    for k in src:
        if torch.is_tensor(src[k]) and not k.startswith("exits."):
            assert torch.equal(src[k], got[k]), k  # backbone bit-identical


@pytest.mark.distributed
@pytest.mark.slow
def test_pp2_tunes_on_short_windows_like_pp1(single_process, exits_nemo, tmp_path):
    """torchrun scripts/ee_tune.py at PP=2 with seq_length=8 (model: 16): the pipeline's p2p shapes follow the
    windows, and the exits equal the PP=1 run's."""
    from nemo_ee.tuning.ee_tune import tune_nemo
    from tests.distributed.test_tune_pp import MAX_DIFF, REPO, _max_diff, launch, nemo_weights

    common = dict(max_steps=3, micro_batch_size=2, seq_length=8, optim={"lr": 1e-2, "weight_decay": 0.0,
                                                                        "clip_grad": 1.0})
    outs = {pp: tmp_path / f"pp{pp}.nemo" for pp in (1, 2)}
    tune_nemo(_cfg(exits_nemo, outs[1], **common))
    run = launch(REPO / "scripts" / "ee_tune.py", f"restore_from={exits_nemo}", f"output={outs[2]}", "max_steps=3",
                 "micro_batch_size=2", "seq_length=8", "optim.lr=1e-2", "data.max_files=5",
                 "pipeline_model_parallel_size=2", f"hydra.run.dir={tmp_path / 'h'}", nproc=2, cwd=tmp_path)
    assert "step 3/3: exit_l1=" in run.stdout and "(ce)" in run.stdout, run.stdout[-2000:]
    pp1, pp2 = nemo_weights(outs[1]), nemo_weights(outs[2])
    exits = [k for k in pp1 if k.startswith("model.exits.")]
    assert _max_diff({k: pp1[k] for k in exits}, {k: pp2[k] for k in exits}) <= MAX_DIFF
