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
    "qwen3": ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
              "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "hidden_act", "attention_bias",
              "use_sliding_window", "sliding_window", "layer_types"],
    "gpt2": ["architectures", "model_type", "n_embd", "n_layer", "n_head", "n_inner", "vocab_size", "n_positions",
             "layer_norm_epsilon", "activation_function", "tie_word_embeddings", "scale_attn_weights"],
}
CASES = {"llama-gqa-tied": "llama", "llama-untied-llama3-rope": "llama", "qwen2": "qwen2", "gpt2": "gpt2",
         "mistral": "mistral", "llama-head-dim-24-untied": "llama", "qwen3-tied": "qwen3",
         "qwen3-untied-mha": "qwen3"}
EXPLICIT = ("mistral",)  # exported when asked for (mistral is llama's layout)
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
    if family not in EXPLICIT:
        assert infer_family({**model.ee_config.to_dict(), "ffn_hidden_size": model.ee_config.ffn_size}) == family
    out = export_model(model, tmp_path / "out", family=family if family in EXPLICIT else None)
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

    # the model's own tokenizer comes back as it was imported (nothing appended), with its stop ids
    assert (out / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()
    text = "def add(a, b):\n    return a + b\n"
    back_tok, orig_tok = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, tmp_path / "hf"))
    assert back_tok(text)["input_ids"] == orig_tok(text)["input_ids"] == model.tokenizer.encode(text)
    assert len(back_tok) == model.tokenizer.vocab_size <= model.ee_config.vocab_size == V
    eos = transformers.GenerationConfig.from_pretrained(out).eos_token_id
    assert tuple(eos if isinstance(eos, list) else [eos]) == model.tokenizer.eos_ids


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


@pytest.mark.parametrize("name", ["llama-head-dim-24-untied", "qwen3-tied", "qwen3-untied-mha"])
def test_adapter_export_inverts_convert(tmp_path, name):
    """The adapter alone (no .nemo, no tokenizer): export(convert(hf)) is every HF tensor bit-exactly, hf_config(arch)
    the HF config's architecture fields, and transformers builds from them the original model's logits."""
    from nemo_ee.checkpoint.hf import adapter_for, convert_hf_state, load_hf_config

    hf = _save_hf(name, tmp_path)
    src = load_hf_config(tmp_path)
    adapter = adapter_for(src)
    assert adapter.name == CASES[name]
    arch, state = convert_hf_state(tmp_path)
    assert adapter.unsupported(arch) == []
    tensors = adapter.export(state, arch)
    original = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(tensors) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(tensors[key], tensor), key
    config = adapter.hf_config(arch)
    for field in ARCH_FIELDS[CASES[name]]:
        assert config.get(field) == src.get(field), field
    back = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config)).float().eval()
    missing, unexpected = back.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    with torch.no_grad():
        assert (back(TOKENS).logits - hf(TOKENS).logits).abs().max().item() <= 1e-4


def test_qk_layernorm_and_head_width_only_export_where_the_family_has_them(single_process):
    from nemo_ee.checkpoint.hf import ADAPTERS
    from nemo_ee.config import EarlyExitConfig

    adapters = {a.name: a for a in ADAPTERS}
    qwen3 = EarlyExitConfig(num_layers=1, hidden_size=32, num_attention_heads=4, kv_channels=12, qk_layernorm=True,
                            vocab_size=300, seq_length=16, normalization="RMSNorm", activation="swiglu",
                            add_bias_linear=False, position_embedding_type="rope").to_dict()
    qwen3["ffn_hidden_size"] = 128
    assert adapters["qwen3"].unsupported(qwen3) == []
    assert adapters["qwen3"].hf_config(qwen3)["head_dim"] == 12
    for family in ("llama", "mistral", "qwen2"):
        assert "qk_layernorm=True (needs False)" in adapters[family].unsupported(qwen3), family
    assert "qk_layernorm=False (needs True)" in adapters["qwen3"].unsupported({**qwen3, "qk_layernorm": False})
    gpt2 = {**qwen3, "normalization": "LayerNorm", "activation": "gelu", "add_bias_linear": True,
            "position_embedding_type": "learned_absolute", "share_embeddings_and_output_weights": True}
    bad = adapters["gpt2"].unsupported(gpt2)
    assert "kv_channels=12 (GPT-2 heads are n_embd / n_head wide)" in bad and "qk_layernorm=True (needs False)" in bad
    assert adapters["gpt2"].unsupported({**gpt2, "kv_channels": 8, "qk_layernorm": False}) == []


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
