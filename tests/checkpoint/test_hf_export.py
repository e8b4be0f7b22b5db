""".nemo -> HF transformers export: HF -> .nemo -> HF reproduces every tensor bit-exactly and the config, the
exported model loads with AutoModelForCausalLM and gives the original logits; exit heads survive
.nemo -> HF -> .nemo through the side files; the script validates its arguments."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from nemo_ee.checkpoint.hf import EXITS_CONFIG, EXITS_WEIGHTS, convert_hf_to_nemo, qkv_from_megatron, qkv_to_megatron  # noqa: E402
from nemo_ee.checkpoint.hf_export import export_model, infer_family, main  # noqa: E402
from tests.checkpoint.test_hf_import import V, _restore, _save_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARCH_FIELDS = {
    "llama": ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
              "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act"],
    "qwen2": ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
              "rope_parameters", "tie_word_embeddings", "hidden_act", "use_sliding_window"],
    "mistral": ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "hidden_act", "sliding_window"],
    "gpt2": ["architectures", "model_type", "n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "n_positions",
             "layer_norm_epsilon", "activation_function", "tie_word_embeddings", "scale_attn_weights"],
}
CASES = {"llama-gqa-tied": "llama", "llama-untied-llama3-rope": "llama", "qwen2": "qwen2", "gpt2": "gpt2",
         "mistral": "mistral"}
TOKENS = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))


def test_qkv_from_megatron_inverts():
    q, k, v = torch.randn(8, 3), torch.randn(4, 3), torch.randn(4, 3)
    back = qkv_from_megatron(qkv_to_megatron(q, k, v, 4, 2, 2), 4, 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@pytest.mark.parametrize("name", list(CASES))
def test_hf_nemo_hf_round_trip(single_process, tmp_path, name):
    hf = _save_hf(name, tmp_path / "hf")
    model = _restore(convert_hf_to_nemo(tmp_path / "hf", tmp_path / "model.nemo"))
    family = CASES[name]
    if family != "mistral":  # mistral is llama's layout: only exported when asked for
        assert infer_family({**model.ee_config.to_dict(), "ffn_hidden_size": model.ee_config.ffn_size}) == family
    out = export_model(model, tmp_path / "out", family="mistral" if family == "mistral" else None)
    assert not (out / EXITS_WEIGHTS).exists() and not (out / EXITS_CONFIG).exists()

    original, exported = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key

    src, dst = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", out))
    for field in ARCH_FIELDS[CASES[name]]:
        assert dst.get(field) == src.get(field), field

    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert (back(TOKENS).logits - hf(TOKENS).logits).abs().max().item() <= 1e-4

    text = "def add(a, b):\n    return a + b\n"
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    # transformers 5 forces its Qwen2Tokenizer (Qwen's own pre-tokenizer regex) on model_type qwen2, whatever
    # tokenizer_config.json says: only the generic class reproduces this toy tokenizer there.
    for tok in (fast,) if CASES[name] == "qwen2" else (fast, auto):
        assert tok(text)["input_ids"] == model.tokenizer._tok.encode(text).ids
        assert (tok.eos_token_id, tok.pad_token_id) == (model.tokenizer.eos_id, model.tokenizer.pad_id)


def test_exits_survive_nemo_hf_nemo(single_process, tmp_path):
    from nemo_ee.tuning.add_exits import add_exits

    _save_hf("llama-gqa-tied", tmp_path / "hf")
    base = _restore(convert_hf_to_nemo(tmp_path / "hf", tmp_path / "base.nemo"))
    model = add_exits(base, [1, 2], exit_mlp=True, init="copy", exit_loss_weights=[0.5, 1.0]).eval()
    with torch.no_grad():
        for p in model.model.exits.parameters():  # heads that differ from their copy-init sources
            p.add_(0.01 * torch.randn_like(p))
    model.save_to(str(tmp_path / "ee.nemo"))
    model = _restore(tmp_path / "ee.nemo")

    out = export_model(model, tmp_path / "out")
    fields = json.loads((out / EXITS_CONFIG).read_text())
    assert fields["exit_layer_nums"] == [1, 2] and fields["exit_mlp"] is True
    assert all(k.startswith("exits.") for k in load_file(str(out / EXITS_WEIGHTS)))
    hf_back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()

    again = _restore(convert_hf_to_nemo(out, tmp_path / "again.nemo"))
    ee, ee2 = model.ee_config, again.ee_config
    for name in ("exit_layer_nums", "exit_position", "exit_norm", "exit_mlp", "exit_block", "tie_exit_output",
                 "exit_loss_weights", "exit_loss_warmup_iters"):
        assert getattr(ee2, name) == getattr(ee, name), name
    a, b = model.model.state_dict(), again.model.state_dict()
    for key, value in a.items():
        if value is not None and not key.endswith("_extra_state"):
            assert torch.equal(b[key], value), key
    with torch.no_grad():
        logits, exits = model(TOKENS)
        logits2, exits2 = again(TOKENS)
        assert (hf_back(TOKENS).logits - logits).abs().max().item() <= 1e-4
    assert torch.equal(logits, logits2)
    assert sorted(exits) == sorted(exits2) and len(exits) == 2
    for key in exits:
        assert torch.equal(exits[key], exits2[key])


def test_unrepresentable_architecture(single_process):
    from nemo_ee.config import EarlyExitConfig

    arch = EarlyExitConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=300, seq_length=16,
                           normalization="RMSNorm", activation="gelu").to_dict()
    arch["ffn_hidden_size"] = 128
    with pytest.raises(ValueError, match=r"no HF family represents.*gpt2 needs normalization='RMSNorm'.*llama needs "
                                          r"activation='gelu' \(needs 'swiglu'\)"):
        infer_family(arch)


def test_wrong_family_is_rejected(single_process, tmp_path):
    _save_hf("gpt2", tmp_path / "hf")
    model = _restore(convert_hf_to_nemo(tmp_path / "hf", tmp_path / "model.nemo"))
    with pytest.raises(ValueError, match=r"cannot be exported as llama: normalization='LayerNorm' \(needs 'RMSNorm'\)"):
        export_model(model, tmp_path / "out", family="llama")


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_nemo_to_hf.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_script_help_and_bad_input(tmp_path):
    res = _script("--help")
    assert res.returncode == 0
    assert "--nemo" in res.stdout and "--out" in res.stdout and "--family" in res.stdout and "gpt2" in res.stdout
    res = _script("--nemo", str(tmp_path / "missing.nemo"), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "missing.nemo: no such file" in res.stderr
    nemo = tmp_path / "x.nemo"
    nemo.write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(SystemExit) as err:
        main(["--nemo", str(nemo), "--out", str(tmp_path / "full")])
    assert err.value.code == 2
    res = _script("--nemo", str(nemo), "--out", str(tmp_path / "full"))
    assert res.returncode == 2 and "not empty; pass --overwrite" in res.stderr


def test_script_end_to_end(single_process, tmp_path):
    hf = _save_hf("qwen2", tmp_path / "hf")
    convert_hf_to_nemo(tmp_path / "hf", tmp_path / "model.nemo")
    main(["--nemo", str(tmp_path / "model.nemo"), "--out", str(tmp_path / "out")])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    with torch.no_grad():
        assert (back(TOKENS).logits - hf(TOKENS).logits).abs().max().item() <= 1e-4
