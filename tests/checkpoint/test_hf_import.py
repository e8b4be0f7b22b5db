"""HF transformers checkpoints -> .nemo: logits match transformers' forward for every supported family,
and bad inputs (unsupported architecture, wrong tensor shape, missing files) fail with clear errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from nemo_ee.checkpoint.hf import convert_hf_to_nemo, qkv_to_megatron, supported_architectures  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
V = 320
TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "import os\nprint(os.getcwd())\n", "early exits read hidden states of layers"] * 4


def _write_tokenizer(path: Path, specials: bool = True) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V - 8, special_tokens=["<|endoftext|>", "<|pad|>"] if specials else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    assert tok.get_vocab_size() <= V
    tok.save(str(path / "tokenizer.json"))


def _llama(**kw):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)
    return transformers.LlamaConfig(**{**base, **kw})


def _qwen3(**kw):
    """Qwen3: per-head q/k RMSNorm, head_dim 24 != hidden_size / heads = 16, rope_theta 1e6."""
    base = dict(hidden_size=64, head_dim=24, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return transformers.Qwen3Config(**{**base, **kw})


CASES = {
    "llama-gqa-tied": lambda: transformers.LlamaForCausalLM(_llama(tie_word_embeddings=True)),
    "llama-untied-llama3-rope": lambda: transformers.LlamaForCausalLM(_llama(
        tie_word_embeddings=False, max_position_embeddings=16384,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=V, max_position_embeddings=128, sliding_window=64, tie_word_embeddings=False)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=64, tie_word_embeddings=True)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64)),
    # explicit head_dim != hidden_size / num_attention_heads (megatron's kv_channels): wider and narrower heads
    "llama-head-dim-24-untied": lambda: transformers.LlamaForCausalLM(_llama(head_dim=24, tie_word_embeddings=False)),
    "llama-head-dim-8-tied-mha": lambda: transformers.LlamaForCausalLM(_llama(
        head_dim=8, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen3-tied": lambda: transformers.Qwen3ForCausalLM(_qwen3(tie_word_embeddings=True)),
    "qwen3-untied-mha": lambda: transformers.Qwen3ForCausalLM(_qwen3(tie_word_embeddings=False,
                                                                     num_key_value_heads=4)),
}
MAX_DIFF: dict[str, float] = {}  # case -> measured max |logit difference| (printed with pytest -s)


def _save_hf(name: str, path: Path, specials: bool = True):
    torch.manual_seed(0)
    model = CASES[name]().float().eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a mis-mapped one shows up in the logits
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    _write_tokenizer(path, specials)
    return model


def _restore(nemo: Path):
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    return EarlyExitGPTNeMoModel.restore_from(str(nemo)).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(single_process, tmp_path, name):
    hf = _save_hf(name, tmp_path / "hf")
    nemo = convert_hf_to_nemo(tmp_path / "hf", tmp_path / "model.nemo")
    model = _restore(nemo)
    assert model.ee_config.num_exits == 0
    tokens = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        got, exits = model(tokens)
    assert exits == {}
    assert got.shape == expected.shape
    MAX_DIFF[name] = (got - expected).abs().max().item()
    print(f"{name}: max |logit diff| = {MAX_DIFF[name]:.3g}")
    assert MAX_DIFF[name] <= 1e-4


def test_head_dim_and_qk_norm_map_to_kv_channels_and_qk_layernorm(tmp_path):
    from nemo_ee.checkpoint.hf import convert_hf_state

    _save_hf("qwen3-tied", tmp_path)
    arch, state = convert_hf_state(tmp_path)
    assert (arch["kv_channels"], arch["qk_layernorm"], arch["add_qkv_bias"]) == (24, True, False)
    assert arch["rotary_base"] == 1000000 and arch["share_embeddings_and_output_weights"] is True
    hf = load_file(str(tmp_path / "model.safetensors"))
    for i in range(2):
        for hf_norm, mg_norm in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
            assert torch.equal(state[f"decoder.layers.{i}.self_attention.{mg_norm}.weight"],
                               hf[f"model.layers.{i}.self_attn.{hf_norm}.weight"])
    assert state["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 24, 64)
    assert state["decoder.layers.0.self_attention.linear_proj.weight"].shape == (64, 4 * 24)
    _save_hf("llama-gqa-tied", tmp_path / "plain")
    plain, _ = convert_hf_state(tmp_path / "plain")
    assert (plain["kv_channels"], plain["qk_layernorm"]) == (None, False)  # head_dim = hidden / heads: default


def test_every_adapter_names_its_model_types():
    from nemo_ee.checkpoint.hf import ADAPTERS

    assert {a.name: a.model_types for a in ADAPTERS} == {
        "llama": ("llama",), "mistral": ("mistral",), "qwen2": ("qwen2",), "qwen3": ("qwen3",), "gpt2": ("gpt2",)}
    assert "Qwen3ForCausalLM" in supported_architectures()


QWEN3_UNSUPPORTED = {
    "sliding window": ({"use_sliding_window": True, "sliding_window": 16},
                       "qwen3: config.json use_sliding_window=True is not supported by the importer"),
    "sliding layer": ({"layer_types": ["full_attention", "sliding_attention"]},
                      "qwen3: config.json layer_types=['full_attention', 'sliding_attention'] is not supported"),
    "attention bias": ({"attention_bias": True}, "qwen3: config.json attention_bias=True is not supported"),
    "activation": ({"hidden_act": "gelu"}, "qwen3: config.json hidden_act='gelu' is not supported"),
    "head_dim": ({"head_dim": 2.5}, "qwen3: config.json head_dim=2.5 is not an integer >= 1"),
}


@pytest.mark.parametrize("change,message", list(QWEN3_UNSUPPORTED.values()), ids=list(QWEN3_UNSUPPORTED))
def test_qwen3_options_megatron_cannot_reproduce_are_rejected(tmp_path, change, message):
    _save_hf("qwen3-tied", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_hf_to_nemo(tmp_path, tmp_path / "x.nemo")


def test_qwen3_greedy_decoding_matches_transformers_generate(single_process, tmp_path):
    """nemo_ee's cached decoding engine (batched, prompts of different lengths) == HF greedy generate."""
    from nemo_ee.inference.generate import GenerationParams, generate

    hf = _save_hf("qwen3-tied", tmp_path / "hf")
    model = _restore(convert_hf_to_nemo(tmp_path / "hf", tmp_path / "model.nemo")).model
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (1, 5, 11)]
    new = 16
    outs = generate(model, prompts, GenerationParams(max_tokens=new))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                              pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist(), prompt
        assert out.exit_layers == [2] * new


def test_qwen3_exit_blocks_decode_like_the_reference(single_process, tmp_path):
    """Exit blocks are built from the same (qk_layernorm) spec and keep their own KV cache: early-exit decoding
    matches the no-cache reference token for token and exit for exit."""
    import dataclasses

    from nemo_ee.inference.generate import GenerationParams, generate
    from nemo_ee.inference.reference import reference_generate
    from nemo_ee.models.early_exit_gpt import build_model

    _save_hf("qwen3-untied-mha", tmp_path / "hf")
    base = _restore(convert_hf_to_nemo(tmp_path / "hf", tmp_path / "model.nemo")).model
    model = build_model(dataclasses.replace(base.ee_config, exit_layer_nums=[1], exit_block=True)).eval()
    state = dict(base.state_dict())
    for key, value in base.state_dict().items():  # the exit = a copy of the last layer, final norm and head
        if key.startswith("decoder.layers.1."):
            state["exits.0.block." + key[len("decoder.layers.1."):]] = value
    state["exits.0.norm.weight"] = state["decoder.final_layernorm.weight"]
    state["exits.0.output_layer.weight"] = state["output_layer.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected, (missing, unexpected)
    assert "exits.0.block.self_attention.q_layernorm.weight" in model.state_dict()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (2, 7)]
    depths = set()
    for threshold in (0.0, 0.012, 0.02):
        params = GenerationParams(max_tokens=10, threshold=threshold)
        for prompt, out in zip(prompts, generate(model, prompts, params)):
            ref = reference_generate(model, prompt, params)
            assert (out.token_ids, out.exit_layers) == (ref.token_ids, ref.exit_layers), threshold
            depths.update(out.exit_layers)
    assert depths == {1, 2}, depths


def test_the_vocabulary_is_kept_exactly(single_process, tmp_path):
    """A tokenizer without nemo_ee's special tokens that fills the vocabulary: nothing is appended, no row is
    added, the logits are the original ones; the stop ids are the model's own (generation_config.json)."""
    _write_tokenizer(tmp_path, specials=False)
    n = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=n,
                                                              n_positions=32, eos_token_id=7, bos_token_id=7)).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    model = _restore(convert_hf_to_nemo(tmp_path, tmp_path / "model.nemo"))
    assert model.tokenizer.vocab_size == model.ee_config.vocab_size == n
    assert model.tokenizer.eos_ids == (7,) and model.tokenizer.pad_id is None  # no pad token: none needed
    tokens = torch.randint(0, n, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, _ = model(tokens)
        expected = hf(tokens).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_config_without_architectures_converts_by_model_type(single_process, tmp_path):
    """A config.json with model_type but no architectures (as transformers writes for a GGUF file) converts."""
    hf = _save_hf("llama-gqa-tied", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = _restore(convert_hf_to_nemo(tmp_path, tmp_path / "model.nemo"))
    tokens = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(tokens)[0] - hf(tokens).logits).abs().max().item() <= 1e-4
    config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture 'bert' \(model_type; config.json lists no "
                                         r"architectures\)"):
        convert_hf_to_nemo(tmp_path, tmp_path / "model2.nemo")


def test_qkv_layout_is_per_query_group():
    heads, groups, d = 4, 2, 1
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    got = qkv_to_megatron(q, k, v, heads, groups, d).flatten().tolist()
    assert got == [0, 1, 10, 20, 2, 3, 11, 21]


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(ValueError, match=r"FooForCausalLM.*supported: .*LlamaForCausalLM.*GPT2LMHeadModel"):
        convert_hf_to_nemo(tmp_path, tmp_path / "x.nemo")


def test_bert_is_unsupported(tmp_path):
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"(?i)unsupported architecture.*bert.*supported: "):
        convert_hf_to_nemo(tmp_path, tmp_path / "x.nemo")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    _save_hf("llama-gqa-tied", tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.1.self_attn.k_proj.weight"
    tensors[key] = torch.zeros(16, 64)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"'{key}' (model.safetensors) has shape [16, 64], expected [32, 64]")):
        convert_hf_to_nemo(tmp_path, tmp_path / "x.nemo")


def test_unsupported_rope_scaling_is_rejected(tmp_path):
    _save_hf("llama-gqa-tied", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 2.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"low_freq_factor=2\.0 cannot be reproduced"):
        convert_hf_to_nemo(tmp_path, tmp_path / "x.nemo")
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'yarn' is not supported"):
        convert_hf_to_nemo(tmp_path, tmp_path / "x.nemo")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_hf_to_nemo(tmp_path / "nope", tmp_path / "x.nemo")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_hf_to_nemo(tmp_path, tmp_path / "x.nemo")
    _save_hf("gpt2", tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        convert_hf_to_nemo(tmp_path, tmp_path / "x.nemo")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        convert_hf_to_nemo(tmp_path, tmp_path / "x.nemo")


def test_script_help():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf_to_nemo.py"), "--help"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "--hf-dir" in out and "--out" in out
    for arch in supported_architectures():
        assert arch in out


def test_new_config_fields(single_process):
    """gelu_approximate and rope_scaling: validated, passed to megatron, parameter count unchanged."""
    import torch.nn.functional as F

    from nemo_ee.config import EarlyExitConfig, gelu_tanh
    from nemo_ee.models.early_exit_gpt import build_model

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=16)
    with pytest.raises(ValueError, match=re.escape("gelu_approximate='tanh' needs activation='gelu', got 'swiglu'")):
        EarlyExitConfig(**base, activation="swiglu", gelu_approximate="tanh")
    with pytest.raises(ValueError, match=re.escape("gelu_approximate='exact' is not one of ['none', 'tanh']")):
        EarlyExitConfig(**base, gelu_approximate="exact")
    with pytest.raises(ValueError, match=re.escape("rope_scaling=True needs position_embedding_type='rope'")):
        EarlyExitConfig(**base, rope_scaling=True)
    with pytest.raises(ValueError, match=re.escape("rope_scaling_factor=0 must be a number > 0")):
        EarlyExitConfig(**base, position_embedding_type="rope", rope_scaling=True, rope_scaling_factor=0)
    cfg = EarlyExitConfig(**base, gelu_approximate="tanh")
    assert cfg.transformer_config().activation_func is gelu_tanh
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    assert sum(p.numel() for p in build_model(cfg).parameters()) == cfg.parameter_count()
    rope = EarlyExitConfig(**base, position_embedding_type="rope", rope_scaling=True, rope_scaling_factor=4.0,
                           rotary_base=500000)
    model = build_model(rope)
    assert sum(p.numel() for p in model.parameters()) == rope.parameter_count()
    plain = build_model(EarlyExitConfig(**base, position_embedding_type="rope", rotary_base=500000))
    assert not torch.allclose(model.rotary_pos_emb.inv_freq, plain.rotary_pos_emb.inv_freq)
