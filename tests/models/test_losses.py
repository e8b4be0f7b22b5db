"""Exit-loss weights, masked reductions, temperature / dynamic token weighting, and the schedule helpers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nemo_ee.models  # noqa: F401  (applies the CPU shim before megatron runs)
from nemo_ee.config import EarlyExitConfig
from nemo_ee.models.losses import (
    ExitWeightSchedule,
    masked_sum,
    scheduled_weight,
    token_weighted_ce,
    weighted_exit_sum,
)
from nemo_ee.parallel.schedules import ExitLossAutoScaler, ExitLossRecorder, split_microbatches


# ---------------------------------------------------------------- scheduled_weight
@pytest.mark.parametrize("iteration,expected", [(0, 0.0), (5, 0.5), (10, 1.0), (20, 1.0), (-3, 0.0)])
def test_linear_warmup(iteration, expected):
    assert scheduled_weight(iteration, 1.0, 0.0, 10, "linear") == expected


@pytest.mark.parametrize(
    "iteration,expected",
    [(0, 0.0), (5, 0.5), (2.5, 0.5 * (1.0 - math.cos(math.pi / 4))), (10, 1.0), (15, 1.0)],
)
def test_cosine_warmup(iteration, expected):
    assert scheduled_weight(iteration, 1.0, 0.0, 10, "cosine") == pytest.approx(expected, abs=1e-15)


def test_cosine_warmup_exact_midpoint_value():
    value = scheduled_weight(2.5, 1.0, 0.0, 10, "cosine")
    assert value == 0.5 * (1.0 - math.cos(math.pi * 0.25))


def test_cooldown_linear():
    assert scheduled_weight(1, 0.25, 1.0, 4, "linear") == 0.8125
    assert scheduled_weight(0, 0.25, 1.0, 4, "linear") == 1.0
    assert scheduled_weight(4, 0.25, 1.0, 4, "linear") == 0.25


def test_cooldown_cosine():
    assert scheduled_weight(2, 0.25, 1.0, 4, "cosine") == pytest.approx(0.625)


@pytest.mark.parametrize("iteration", [0, 1, 7, 100])
def test_no_init_is_constant(iteration):
    assert scheduled_weight(iteration, 0.7, None, 10, "linear") == 0.7
    assert scheduled_weight(iteration, 0.7, None, 10, "cosine") == 0.7


@pytest.mark.parametrize("iteration", [0, 1, 7, 100])
def test_no_warmup_is_constant(iteration):
    assert scheduled_weight(iteration, 0.7, 0.0, 0, "linear") == 0.7


def test_returns_python_float():
    assert type(scheduled_weight(3, 1, 0, 10, "linear")) is float
    assert type(scheduled_weight(30, 1, 0, 10, "linear")) is float


def test_bad_style_raises():
    with pytest.raises(ValueError, match="style"):
        scheduled_weight(3, 1.0, 0.0, 10, "exponential")


# ---------------------------------------------------------------- ExitWeightSchedule
def _two_exit_config(**kwargs):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8, exit_layer_nums=[1, 2])
    base.update(kwargs)
    return EarlyExitConfig(**base)


def test_schedule_from_config_per_exit_lists():
    cfg = _two_exit_config(
        exit_loss_weights=[0.5, 1.0],
        exit_loss_init_weights=[0.0, 2.0],
        exit_loss_warmup_iters=[4, 10],
        exit_loss_warmup_style=["linear", "cosine"],
    )
    schedule = ExitWeightSchedule.from_config(cfg)
    assert schedule.targets == [0.5, 1.0]
    assert schedule.inits == [0.0, 2.0]
    assert schedule.warmups == [4, 10]
    assert schedule.styles == ["linear", "cosine"]
    assert schedule.weights(0) == [0.0, 2.0]
    w = schedule.weights(2)
    assert w[0] == 0.25
    assert w[1] == pytest.approx(2.0 - 0.5 * (1.0 - math.cos(math.pi * 0.2)))
    assert schedule.weights(5) == pytest.approx([0.5, 1.5])
    assert schedule.weights(10) == [0.5, 1.0]
    assert schedule.weights(1000) == [0.5, 1.0]


def test_schedule_from_config_scalars_broadcast():
    cfg = _two_exit_config(exit_loss_weights=0.3, exit_loss_init_weights=None, exit_loss_warmup_iters=5)
    schedule = ExitWeightSchedule.from_config(cfg)
    assert schedule.weights(0) == [0.3, 0.3]
    assert schedule.weights(3) == [0.3, 0.3]


def test_schedule_mixed_none_init():
    cfg = _two_exit_config(exit_loss_weights=[1.0, 0.5], exit_loss_init_weights=[None, 0.0], exit_loss_warmup_iters=2)
    schedule = ExitWeightSchedule.from_config(cfg)
    assert schedule.weights(0) == [1.0, 0.0]
    assert schedule.weights(1) == [1.0, 0.25]
    assert schedule.weights(2) == [1.0, 0.5]


# ---------------------------------------------------------------- masked_sum / weighted_exit_sum
PER_TOKEN_A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
PER_TOKEN_B = torch.tensor([[0.5, 0.25, 8.0], [2.0, 1.0, 100.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum():
    assert masked_sum(PER_TOKEN_A, MASK).item() == 1.0 + 2.0 + 4.0
    assert masked_sum(PER_TOKEN_B, MASK).item() == 0.5 + 0.25 + 2.0
    assert masked_sum(PER_TOKEN_A, torch.zeros_like(MASK)).item() == 0.0
    assert masked_sum(PER_TOKEN_A, torch.ones_like(MASK)).item() == 21.0


def test_masked_sum_is_fp32_and_differentiable():
    x = PER_TOKEN_A.to(torch.bfloat16).requires_grad_()
    s = masked_sum(x, MASK.bool())
    assert s.dtype == torch.float32 and s.shape == ()
    s.backward()
    assert torch.equal(x.grad.float(), MASK.float())


def test_weighted_exit_sum_all_exits():
    weights = [0.5, 2.0]
    total = weighted_exit_sum({0: PER_TOKEN_A, 1: PER_TOKEN_B}, weights, MASK)
    assert total.item() == pytest.approx(0.5 * 7.0 + 2.0 * 2.75)


def test_weighted_exit_sum_subset_of_exits():
    # as on one pipeline stage: only exit 1 of three lives here; the weights are indexed globally
    weights = [10.0, 0.25, 100.0]
    total = weighted_exit_sum({1: PER_TOKEN_B}, weights, MASK)
    assert total.item() == pytest.approx(0.25 * 2.75)
    total = weighted_exit_sum({0: PER_TOKEN_A, 2: PER_TOKEN_B}, weights, MASK)
    assert total.item() == pytest.approx(10.0 * 7.0 + 100.0 * 2.75)


def test_weighted_exit_sum_no_exits():
    total = weighted_exit_sum({}, [1.0], MASK)
    assert total.shape == () and total.dtype == torch.float32 and total.item() == 0.0


def test_token_weighted_ce_detaches_prob():
    ce = torch.tensor([1.0, 2.0], requires_grad=True)
    p = torch.tensor([0.5, 0.25], requires_grad=True)
    out = token_weighted_ce(ce, p)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.tensor([0.5, 0.5]))
    assert torch.equal(ce.grad, torch.tensor([0.5, 0.25]))
    assert p.grad is None
    assert token_weighted_ce(ce, None) is ce


# ---------------------------------------------------------------- temperature + dynamic weighting in the model
TEMPERATURE = 2.0


@pytest.fixture
def small_model(single_process):
    from nemo_ee.models import build_model

    torch.manual_seed(0)
    cfg = EarlyExitConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8,
        exit_layer_nums=[1], exit_logit_temperature=TEMPERATURE, exit_dynamic_token_weight=True,
    )
    model = build_model(cfg)
    # larger exit weights so that the softmax is far from uniform and the weighting matters
    with torch.no_grad():
        model.exits["0"].output_layer.weight.normal_(0.0, 0.5)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 64, (2, 8), generator=gen)
    labels = torch.randint(0, 64, (2, 8), generator=gen)
    pos = torch.arange(8).unsqueeze(0).expand(2, 8).contiguous()
    return model, tokens, pos, labels


def _hand_exit_loss(logits, labels, temperature, detach_prob=True):
    z = logits.float() / temperature
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction="none").view(labels.shape)
    prob = torch.softmax(z, dim=-1).max(dim=-1).values
    return ce * (prob.detach() if detach_prob else prob)


def test_exit_logits_shape(small_model):
    model, tokens, pos, _ = small_model
    model.eval()
    with torch.no_grad():
        out = model(tokens, pos, None)
    assert list(out.exits) == [0]
    assert out.exits[0].shape == (2, 8, 64)
    assert out.output.shape == (2, 8, 64)


def test_training_exit_loss_uses_temperature_and_dynamic_weight(small_model):
    model, tokens, pos, labels = small_model
    model.eval()
    with torch.no_grad():
        logits = model(tokens, pos, None).exits[0]
    model.train()
    with torch.no_grad():
        loss = model(tokens, pos, None, labels=labels).exits[0]
    assert loss.shape == (2, 8)
    expected = _hand_exit_loss(logits, labels, TEMPERATURE)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    # the weighting is not a no-op here
    plain = F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), reduction="none").view(2, 8)
    assert (loss - plain).abs().max() > 1e-3


def test_dynamic_weight_without_temperature(single_process):
    """Temperature 1: the CE runs on the head's own logits tensor (which megatron's CE overwrites in place)."""
    from nemo_ee.models import build_model

    torch.manual_seed(1)
    cfg = EarlyExitConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=8,
        exit_layer_nums=[1], exit_logit_temperature=1.0, exit_dynamic_token_weight=True,
    )
    model = build_model(cfg)
    with torch.no_grad():
        model.exits["0"].output_layer.weight.normal_(0.0, 0.5)
    tokens = torch.randint(0, 64, (2, 8))
    labels = torch.randint(0, 64, (2, 8))
    pos = torch.arange(8).unsqueeze(0).expand(2, 8).contiguous()
    model.train()
    with torch.no_grad():
        logits = model(tokens, pos, None).exits[0]
        loss = model(tokens, pos, None, labels=labels).exits[0]
    torch.testing.assert_close(loss, _hand_exit_loss(logits, labels, 1.0), rtol=0, atol=1e-5)


def test_eval_exit_loss_is_plain_ce(small_model):
    model, tokens, pos, labels = small_model
    model.eval()
    with torch.no_grad():
        logits = model(tokens, pos, None).exits[0]
        loss = model(tokens, pos, None, labels=labels).exits[0]
    expected = F.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), reduction="none").view(2, 8)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


def test_dynamic_weight_has_no_gradient(small_model):
    model, tokens, pos, labels = small_model
    weight = model.exits["0"].output_layer.weight
    model.train()

    model.zero_grad(set_to_none=True)
    model(tokens, pos, None, labels=labels).exits[0].sum().backward()
    grad_model = weight.grad.clone()

    model.zero_grad(set_to_none=True)
    logits = model(tokens, pos, None).exits[0]
    _hand_exit_loss(logits, labels, TEMPERATURE, detach_prob=True).sum().backward()
    grad_detached = weight.grad.clone()

    model.zero_grad(set_to_none=True)
    logits = model(tokens, pos, None).exits[0]
    _hand_exit_loss(logits, labels, TEMPERATURE, detach_prob=False).sum().backward()
    grad_through_prob = weight.grad.clone()
    model.zero_grad(set_to_none=True)

    torch.testing.assert_close(grad_model, grad_detached, rtol=1e-4, atol=1e-6)
    # had the max-prob carried gradient, the result would differ
    assert (grad_model - grad_through_prob).abs().max() > 1e-4


# ---------------------------------------------------------------- ExitLossAutoScaler
@pytest.fixture
def restore_scale():
    saved = ExitLossAutoScaler.scale
    yield
    ExitLossAutoScaler.scale = saved


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_exit_loss_auto_scaler(restore_scale, scale):
    ExitLossAutoScaler.scale = torch.tensor(scale)
    x = torch.randn(3, 2, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    loss = (w ** 2).sum()
    y = ExitLossAutoScaler.apply(x, loss)
    assert torch.equal(y, x)
    g = torch.randn(3, 2)
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)
    torch.testing.assert_close(w.grad, scale * 2 * w.detach())


def test_exit_loss_auto_scaler_no_loss_gradient_without_backward_through_output(restore_scale):
    ExitLossAutoScaler.scale = torch.tensor(0.5)
    x = torch.randn(2, requires_grad=True)
    w = torch.tensor([3.0], requires_grad=True)
    y = ExitLossAutoScaler.apply(x, (w * 4).sum())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(2))
    torch.testing.assert_close(w.grad, torch.tensor([2.0]))


# ---------------------------------------------------------------- ExitLossRecorder, split_microbatches
def test_exit_loss_recorder_reduce_world_of_one(single_process):
    rec = ExitLossRecorder(num_exits=2)
    rec.add(0, torch.tensor(6.0), torch.tensor(3))
    rec.add(0, torch.tensor(3.0), torch.tensor(3))
    rec.add(1, torch.tensor(4.0, requires_grad=True), torch.tensor(2))
    rec.add(1, torch.tensor(2.0), torch.tensor(4))
    means = rec.reduce()
    assert means == {"final": pytest.approx(1.5), "exit0": pytest.approx(1.0), "exit1": 0.0}
    # reduce does not modify the accumulators
    assert rec.sums.tolist() == [9.0, 6.0, 0.0]
    assert rec.tokens.tolist() == [6.0, 6.0, 0.0]


def _batch(n, s=4):
    return {
        "tokens": torch.arange(n * s).view(n, s),
        "labels": torch.arange(n * s).view(n, s) + 1,
        "loss_mask": torch.ones(n, s),
        "position_ids": torch.arange(s).repeat(n, 1),
    }


def test_split_microbatches():
    batch = _batch(6)
    mbs = split_microbatches(batch, 2)
    assert len(mbs) == 3
    for i, mb in enumerate(mbs):
        assert set(mb) == set(batch)
        for k in batch:
            assert torch.equal(mb[k], batch[k][2 * i:2 * i + 2])
    assert len(split_microbatches(batch, 6)) == 1
    assert len(split_microbatches(batch, 1)) == 6


def test_split_microbatches_indivisible():
    with pytest.raises(ValueError, match="divisible"):
        split_microbatches(_batch(6), 4)


# ---------------------------------------------------------------- distillation (EE-Tuning loss=kl)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_distillation_kl_matches_kl_div(temperature):
    from nemo_ee.models.losses import distillation_kl, distillation_targets

    g = torch.Generator().manual_seed(0)
    final = torch.randn(2, 5, 11, generator=g) * 3
    student = (torch.randn(2, 5, 11, generator=g) * 3).requires_grad_(True)
    keep = final.clone()
    probs, neg_entropy = distillation_targets(final, temperature)
    assert torch.equal(final, keep)  # not in place unless asked
    assert not probs.requires_grad and probs.shape == final.shape and neg_entropy.shape == (2, 5)
    got = distillation_kl(student, probs, neg_entropy, temperature)
    ref = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(final / temperature, -1),
                   reduction="none", log_target=True).sum(-1) * temperature ** 2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    # d/dz T^2 KL(p || softmax(z / T)) = T (softmax(z / T) - p)
    expected = temperature * (torch.softmax(student.detach() / temperature, -1) - torch.softmax(final / temperature, -1))
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-6)
    # in place: the logits buffer becomes p log p, the result is the same
    buf = final.clone()
    p2, e2 = distillation_targets(buf, temperature, inplace=True)
    torch.testing.assert_close(p2, probs, rtol=0, atol=0)
    torch.testing.assert_close(e2, neg_entropy, rtol=0, atol=0)
    assert not torch.equal(buf, final)


def test_distillation_kl_is_zero_on_the_teacher_and_fp32_for_bf16():
    from nemo_ee.models.losses import distillation_kl, distillation_targets

    logits = torch.randn(3, 7, 13).bfloat16()
    probs, neg_entropy = distillation_targets(logits, 2.0, inplace=True)
    assert probs.dtype == torch.float32 and neg_entropy.dtype == torch.float32
    kl = distillation_kl(logits, probs, neg_entropy, 2.0)  # bf16 logits untouched (the fp32 copy was used)
    assert kl.dtype == torch.float32 and float(kl.abs().max()) < 1e-5
