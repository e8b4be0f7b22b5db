"""The decode-step profile (scripts/profile_decode.py)."""
import pytest

from nemo_ee.inference.profile import MATMUL_OPS, format_profile, profile_step


def matmuls(result):
    return sum(row["calls"] for row in result["table"] if row["op"] in MATMUL_OPS)


def test_profile_of_a_decode_step(rope_model):
    full = profile_step(rope_model, batch=2, context=8, steps=3, rows=1000)
    # 4 layers (qkv, proj, fc1, fc2) + the output layer, batch 2 in one product each: 17 matmuls a step
    assert matmuls(full) == pytest.approx(4 * 4 + 1)
    assert full["fast_path"] and full["step_ms"] > 0 and 0 < full["matmul_share"] <= 1
    draft = profile_step(rope_model, batch=1, context=8, steps=3, exit_layer=1, rows=1000)
    # layer 1, then the exit: its transformer block (4), its MLP (2) and its output layer
    assert matmuls(draft) == pytest.approx(4 + 4 + 2 + 1)
    assert "matmul" in format_profile(full).splitlines()[-1]
    with pytest.raises(ValueError, match=r"exit layer 4 is not an exit of this model \(exits at \[1, 2, 3\]\)"):
        profile_step(rope_model, exit_layer=4)
