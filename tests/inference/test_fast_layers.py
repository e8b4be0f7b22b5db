"""The fast decoding path (plain tensor ops on megatron's parameters) against megatron's own modules."""
import pytest
import torch

from nemo_ee.inference.engine import EarlyExitEngine
from nemo_ee.inference.policies import ExitRule

from .conftest import train_model


@pytest.fixture(scope="module")
def qk_norm_model(world):
    """Qwen3-like: q/k norms, head_dim 16 != hidden/heads, GQA, an exit MLP."""
    return train_model(position_embedding_type="rope", num_query_groups=2, activation="swiglu",
                       normalization="RMSNorm", qk_layernorm=True, kv_channels=16, exit_mlp=True)


def run_steps(model, fast: bool):
    """A ragged batch of 3 rows: prefill, early-exit steps (KV recomputation), a verify step with final logits."""
    engine = EarlyExitEngine(model, 3, 40, fast=fast)
    assert engine.fast is fast
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 1, 9)]
    rules = [ExitRule("max_prob", 0.06), ExitRule("max_prob", 0.2), ExitRule.full()]
    results = [engine.step([0, 1, 2], prompts, rules)]
    tokens = [[int(results[-1][r].logits.argmax())] for r in range(3)]
    for step in range(8):
        rows = [0, 1, 2] if step % 3 else [2, 0]
        res = engine.step(rows, [tokens[r] for r in rows], [rules[r] for r in rows])
        results.append(res)
        for r in rows:
            tokens[r] = [int(res[r].logits.argmax())]
    base = engine.length(1)
    res = engine.step([1, 0], [tokens[1] + [3, 4], tokens[0]], [ExitRule.full(), ExitRule(forced=1)],
                      final_from=[base, None])
    results.append(res)
    return results, engine


@pytest.mark.parametrize("which", ["rope_model", "gpt2_model", "qk_norm_model"])
def test_fast_path_matches_megatrons_modules(which, request):
    model = request.getfixturevalue(which)
    fast, fast_engine = run_steps(model, True)
    slow, slow_engine = run_steps(model, False)
    exits = deep = 0
    for a, b in zip(fast, slow):
        assert sorted(a) == sorted(b)
        for row in a:
            assert (a[row].exit_index, a[row].depth) == (b[row].exit_index, b[row].depth)
            torch.testing.assert_close(a[row].logits, b[row].logits, rtol=0, atol=2e-5)
            exits += a[row].exit_index is not None
            deep += a[row].exit_index is None and row != 2
    torch.testing.assert_close(fast[-1][1].final_logits, slow[-1][1].final_logits, rtol=0, atol=2e-5)
    assert fast[-1][1].final_logits.shape[0] == 3
    assert exits >= 3 and deep >= 2  # tokens left early, and later ones went deeper (recomputing missing KV)
    for slot in fast_engine.cache.k:
        assert fast_engine.cache.length[slot] == slow_engine.cache.length[slot]
        torch.testing.assert_close(fast_engine.cache.k[slot], slow_engine.cache.k[slot], rtol=0, atol=2e-5)


def test_fast_path_refuses_what_it_does_not_reproduce(rope_model):
    config = rope_model.config
    config.rotary_interleaved = True
    try:
        with pytest.raises(ValueError, match=r"the fast decoding path cannot run this model: layer 1: "
                                             r"config.rotary_interleaved=True is not reproduced"):
            EarlyExitEngine(rope_model, 1, 8, fast=True)
        engine = EarlyExitEngine(rope_model, 1, 8)  # automatic: megatron's modules
        assert not engine.fast and "rotary_interleaved" in engine.fast_problem
    finally:
        config.rotary_interleaved = False
    assert EarlyExitEngine(rope_model, 1, 8).fast
