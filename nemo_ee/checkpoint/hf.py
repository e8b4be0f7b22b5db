"""Import Hugging Face transformers checkpoints (config.json + *.safetensors + tokenizer.json) as .nemo.

One small adapter per model family (torchtitan-style ``state_dict_adapter``): it maps the HF config to
:class:`EarlyExitConfig` fields (rejecting what megatron cannot reproduce) and the HF tensors to
megatron-core ``GPTModel`` state-dict keys. Weights are read with ``safetensors`` only (never
``torch.load``); every tensor's shape is checked against the shape the config implies.

Megatron layout notes:
  * ``linear_qkv`` rows are per query group: for each group, its query heads, then its key head,
    then its value head (``num_heads / num_groups * head_dim + 2 * head_dim`` rows per group);
  * SwiGLU ``linear_fc1`` is ``cat([gate, up])``;
  * RoPE in the local spec is the non-interleaved rotate-half form, as in HF Llama;
  * ``rope_scaling`` implements llama 3.x scaling with low/high frequency factors 1 and 4 and
    8192 original positions, fixed: other llama3 parameters are rejected.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

import torch

# megatron's RotaryEmbedding._apply_scaling defaults (megatron-core 0.16), the only llama3 scaling it runs.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Side files of an exported early-exit model (see nemo_ee/checkpoint/hf_export.py): the exit heads' megatron
# tensors (keys ``exits.*``) and the EarlyExitConfig exit fields. Not part of the HF backbone.
EXITS_WEIGHTS = "early_exits.safetensors"
EXITS_CONFIG = "early_exits.json"


# --------------------------------------------------------------------------------------------- reading
class SafetensorsReader:
    """Lazy, shape-checked access to the tensors of every ``*.safetensors`` file in a directory."""

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        files = sorted(f for f in hf_dir.glob("*.safetensors") if f.name != EXITS_WEIGHTS)
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {hf_dir} (pytorch_model.bin is not read: "
                                    "convert it to safetensors first)")
        self._handles: dict[str, Any] = {}
        self._file: dict[str, Path] = {}
        for path in files:
            handle = safe_open(str(path), framework="pt", device="cpu")
            for key in handle.keys():
                if key in self._file:
                    raise ValueError(f"tensor {key!r} appears in both {self._file[key].name} and {path.name}")
                self._handles[key] = handle
                self._file[key] = path
        self.used: set[str] = set()

    def keys(self) -> set[str]:
        return set(self._file)

    def __contains__(self, key: str) -> bool:
        return key in self._file

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self._file:
            raise KeyError(f"HF checkpoint has no tensor {key!r}")
        actual = tuple(self._handles[key].get_slice(key).get_shape())
        if actual != tuple(shape):
            raise ValueError(f"HF tensor {key!r} ({self._file[key].name}) has shape {list(actual)}, expected "
                             f"{list(shape)} from config.json")
        self.used.add(key)
        return self._handles[key].get_tensor(key).to(torch.float32)


def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Separate q/k/v projections (weights [out, in] or biases [out]) -> megatron's per-group linear_qkv."""
    tail = q.shape[1:]
    q = q.reshape(groups, heads // groups * head_dim, *tail)
    k = k.reshape(groups, head_dim, *tail)
    v = v.reshape(groups, head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail).contiguous()


def qkv_from_megatron(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of :func:`qkv_to_megatron`: megatron's per-group linear_qkv -> (q, k, v), each contiguous."""
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, heads // groups * head_dim + 2 * head_dim, *tail).split(
        [heads // groups * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def _rope_parameters(a: dict) -> dict:
    """Inverse of :func:`_rope`: HF ``rope_parameters`` of the arch's rotary fields."""
    params: dict[str, Any] = {"rope_theta": float(a.get("rotary_base", 10000))}
    if a.get("rope_scaling"):
        params.update(rope_type="llama3", factor=float(a.get("rope_scaling_factor", 8.0)), **MEGATRON_LLAMA3_ROPE)
    else:
        params["rope_type"] = "default"
    return params


def _need(hf: dict, key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}")
    return hf[key]


def _reject(hf: dict, family: str, **allowed: Any) -> None:
    """Fail on HF options whose value changes the math in a way megatron's GPTModel does not implement."""
    for key, ok in allowed.items():
        value = hf.get(key, ok if not callable(ok) else None)
        good = ok(value) if callable(ok) else value == ok
        if not good:
            raise ValueError(f"{family}: config.json {key}={value!r} is not supported by the importer")


def _rotary_base(theta: Any) -> int:
    if float(theta) != int(float(theta)):
        raise ValueError(f"rope_theta={theta!r} is not an integer; megatron's rotary_base is an int")
    return int(float(theta))


def _rope(hf: dict, family: str) -> dict:
    """rotary_base / rope_scaling fields from either ``rope_theta`` + ``rope_scaling`` or ``rope_parameters``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rotary_base": _rotary_base(theta)}
    if rope_type in (None, "default"):
        return out
    if rope_type != "llama3":
        raise ValueError(f"{family}: rope scaling of type {rope_type!r} is not supported (megatron implements "
                         "only 'llama3' scaling)")
    for key, expected in MEGATRON_LLAMA3_ROPE.items():
        if float(merged.get(key, float("nan"))) != expected:
            raise ValueError(
                f"{family}: llama3 rope scaling {key}={merged.get(key)!r} cannot be reproduced: megatron's "
                f"rope scaling fixes {MEGATRON_LLAMA3_ROPE}"
            )
    out.update(rope_scaling=True, rope_scaling_factor=float(_need(merged, "factor")))
    return out


# --------------------------------------------------------------------------------------------- adapters
class Adapter(ABC):
    """One HF model family: config mapping and tensor mapping, both directions."""

    name = ""
    architectures: tuple[str, ...] = ()
    ignored = re.compile(r"$^")  # HF keys that are buffers, not parameters

    @abstractmethod
    def arch(self, hf: dict) -> dict:
        ...

    @abstractmethod
    def convert(self, read: SafetensorsReader, arch: dict) -> dict[str, torch.Tensor]:
        ...

    # ---- export (megatron -> HF), the inverse of arch/convert
    @abstractmethod
    def unsupported(self, arch: dict) -> list[str]:
        """Reasons this family cannot represent ``arch`` (empty = it can)."""

    @abstractmethod
    def hf_config(self, arch: dict) -> dict:
        ...

    @abstractmethod
    def export(self, state: dict[str, torch.Tensor], arch: dict) -> dict[str, torch.Tensor]:
        ...


def _mismatch(arch: dict, **want: Any) -> list[str]:
    return [f"{k}={arch.get(k)!r} (needs {v!r})" for k, v in want.items() if arch.get(k) != v]


class LlamaAdapter(Adapter):
    """Llama 2/3 (GQA, rope_theta, llama3 rope scaling, tied or untied output); base for Mistral and Qwen2."""

    name = "llama"
    architectures = ("LlamaForCausalLM",)
    ignored = re.compile(r".*rotary_emb\.inv_freq$")
    qkv_bias = False

    def check(self, hf: dict) -> None:
        _reject(hf, self.name, hidden_act="silu", attention_bias=False, mlp_bias=False,
                pretraining_tp=lambda v: v in (None, 1))

    def arch(self, hf: dict) -> dict:
        self.check(hf)
        h, heads = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
        head_dim = hf.get("head_dim") or h // heads
        if head_dim * heads != h:
            raise ValueError(f"{self.name}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={h} "
                             "is not supported")
        groups = hf.get("num_key_value_heads") or heads
        max_pos = int(_need(hf, "max_position_embeddings"))
        seq = min(max_pos, int(hf.get("sliding_window") or max_pos)) if self.sliding_window(hf) else max_pos
        return dict(
            num_layers=_need(hf, "num_hidden_layers"), hidden_size=h, num_attention_heads=heads,
            num_query_groups=None if groups == heads else groups, ffn_hidden_size=_need(hf, "intermediate_size"),
            vocab_size=_need(hf, "vocab_size"), seq_length=seq, max_position_embeddings=max_pos,
            normalization="RMSNorm", activation="swiglu", add_bias_linear=False, add_qkv_bias=self.qkv_bias,
            position_embedding_type="rope", **_rope(hf, self.name),
            share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
            layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        )

    def sliding_window(self, hf: dict) -> bool:
        return False

    def convert(self, read: SafetensorsReader, a: dict) -> dict[str, torch.Tensor]:
        h, heads, f, v = a["hidden_size"], a["num_attention_heads"], a["ffn_hidden_size"], a["vocab_size"]
        groups = a["num_query_groups"] or heads
        d = h // heads
        out = {"embedding.word_embeddings.weight": read.get("model.embed_tokens.weight", (v, h)),
               "decoder.final_layernorm.weight": read.get("model.norm.weight", (h,))}
        for i in range(a["num_layers"]):
            p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            qkv = [read.get(f"{p}self_attn.{n}_proj.weight", (rows, h))
                   for n, rows in (("q", heads * d), ("k", groups * d), ("v", groups * d))]
            out[f"{m}self_attention.linear_qkv.weight"] = qkv_to_megatron(*qkv, heads, groups, d)
            if self.qkv_bias:
                qkv = [read.get(f"{p}self_attn.{n}_proj.bias", (rows,))
                       for n, rows in (("q", heads * d), ("k", groups * d), ("v", groups * d))]
                out[f"{m}self_attention.linear_qkv.bias"] = qkv_to_megatron(*qkv, heads, groups, d)
            out[f"{m}self_attention.linear_proj.weight"] = read.get(f"{p}self_attn.o_proj.weight", (h, heads * d))
            out[f"{m}input_layernorm.weight"] = read.get(f"{p}input_layernorm.weight", (h,))
            out[f"{m}pre_mlp_layernorm.weight"] = read.get(f"{p}post_attention_layernorm.weight", (h,))
            out[f"{m}mlp.linear_fc1.weight"] = torch.cat(
                [read.get(f"{p}mlp.gate_proj.weight", (f, h)), read.get(f"{p}mlp.up_proj.weight", (f, h))])
            out[f"{m}mlp.linear_fc2.weight"] = read.get(f"{p}mlp.down_proj.weight", (h, f))
        if not a["share_embeddings_and_output_weights"]:
            out["output_layer.weight"] = read.get("lm_head.weight", (v, h))
        elif "lm_head.weight" in read:  # a tied checkpoint that stores the (identical) head anyway
            read.get("lm_head.weight", (v, h))
        return out

    def unsupported(self, a: dict) -> list[str]:
        return _mismatch(a, normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                         add_qkv_bias=self.qkv_bias, position_embedding_type="rope")

    def hf_config(self, a: dict) -> dict:
        heads = a["num_attention_heads"]
        return dict(
            architectures=list(self.architectures), model_type=self.name, hidden_act="silu",
            hidden_size=a["hidden_size"], intermediate_size=a["ffn_hidden_size"],
            num_hidden_layers=a["num_layers"], num_attention_heads=heads,
            num_key_value_heads=a.get("num_query_groups") or heads, head_dim=a["hidden_size"] // heads,
            vocab_size=a["vocab_size"], max_position_embeddings=a["max_position_embeddings"],
            rms_norm_eps=float(a["layernorm_epsilon"]), rope_parameters=_rope_parameters(a),
            tie_word_embeddings=bool(a["share_embeddings_and_output_weights"]), attention_dropout=0.0,
            initializer_range=float(a.get("init_method_std", 0.02)), **self.family_config(a),
        )

    def family_config(self, a: dict) -> dict:
        return dict(attention_bias=False, mlp_bias=False, pretraining_tp=1)

    def export(self, state: dict[str, torch.Tensor], a: dict) -> dict[str, torch.Tensor]:
        heads = a["num_attention_heads"]
        groups, d = a.get("num_query_groups") or heads, a["hidden_size"] // heads
        f = a["ffn_hidden_size"]
        out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
               "model.norm.weight": state["decoder.final_layernorm.weight"]}
        for i in range(a["num_layers"]):
            p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            q, k, v = qkv_from_megatron(state[f"{m}self_attention.linear_qkv.weight"], heads, groups, d)
            out.update({f"{p}self_attn.q_proj.weight": q, f"{p}self_attn.k_proj.weight": k,
                        f"{p}self_attn.v_proj.weight": v})
            if self.qkv_bias:
                q, k, v = qkv_from_megatron(state[f"{m}self_attention.linear_qkv.bias"], heads, groups, d)
                out.update({f"{p}self_attn.q_proj.bias": q, f"{p}self_attn.k_proj.bias": k,
                            f"{p}self_attn.v_proj.bias": v})
            out[f"{p}self_attn.o_proj.weight"] = state[f"{m}self_attention.linear_proj.weight"]
            out[f"{p}input_layernorm.weight"] = state[f"{m}input_layernorm.weight"]
            out[f"{p}post_attention_layernorm.weight"] = state[f"{m}pre_mlp_layernorm.weight"]
            gate, up = state[f"{m}mlp.linear_fc1.weight"].split([f, f])
            out[f"{p}mlp.gate_proj.weight"], out[f"{p}mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
            out[f"{p}mlp.down_proj.weight"] = state[f"{m}mlp.linear_fc2.weight"]
        if not a["share_embeddings_and_output_weights"]:
            out["lm_head.weight"] = state["output_layer.weight"]
        return out


class MistralAdapter(LlamaAdapter):
    """Mistral: Llama layout; a sliding window caps the sequence length (exact within the window)."""

    name = "mistral"
    architectures = ("MistralForCausalLM",)

    def check(self, hf: dict) -> None:
        _reject(hf, self.name, hidden_act="silu")

    def sliding_window(self, hf: dict) -> bool:
        return True

    def family_config(self, a: dict) -> dict:
        # the importer capped seq_length at the sliding window; a shorter seq_length is exported as the window
        seq, max_pos = a.get("seq_length"), a["max_position_embeddings"]
        return dict(sliding_window=seq if seq and seq < max_pos else None)


class Qwen2Adapter(LlamaAdapter):
    """Qwen2: Llama layout with q/k/v biases (no output-projection or MLP bias)."""

    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    qkv_bias = True

    def check(self, hf: dict) -> None:
        _reject(hf, self.name, hidden_act="silu", use_sliding_window=lambda v: not v)

    def family_config(self, a: dict) -> dict:
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=a["num_layers"],
                    layer_types=["full_attention"] * a["num_layers"])


class GPT2Adapter(Adapter):
    """GPT-2: learned positions, LayerNorm, gelu_new (tanh GELU), biases everywhere, Conv1D ([in, out]) weights."""

    name = "gpt2"
    architectures = ("GPT2LMHeadModel",)
    ignored = re.compile(r".*attn\.(masked_)?bias$")
    _GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": None, "gelu": "none"}

    def arch(self, hf: dict) -> dict:
        _reject(hf, self.name, scale_attn_weights=lambda v: v in (None, True),
                scale_attn_by_inverse_layer_idx=lambda v: not v, add_cross_attention=lambda v: not v,
                tie_word_embeddings=lambda v: v in (None, True))
        act = hf.get("activation_function", "gelu_new")
        if self._GELU.get(act) is None:
            raise ValueError(f"gpt2: activation_function={act!r} is not supported "
                             f"(supported: {[k for k, v in self._GELU.items() if v]})")
        h, heads = _need(hf, "n_embd"), _need(hf, "n_head")
        positions = int(_need(hf, "n_positions"))
        return dict(
            num_layers=_need(hf, "n_layer"), hidden_size=h, num_attention_heads=heads,
            ffn_hidden_size=hf.get("n_inner") or 4 * h, vocab_size=_need(hf, "vocab_size"),
            seq_length=positions, max_position_embeddings=positions, normalization="LayerNorm",
            activation="gelu", gelu_approximate=self._GELU[act], add_bias_linear=True,
            position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True,
            layernorm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )

    def convert(self, read: SafetensorsReader, a: dict) -> dict[str, torch.Tensor]:
        h, heads, f, v = a["hidden_size"], a["num_attention_heads"], a["ffn_hidden_size"], a["vocab_size"]
        d = h // heads
        pre = "transformer." if "transformer.wte.weight" in read else ""
        out = {"embedding.word_embeddings.weight": read.get(f"{pre}wte.weight", (v, h)),
               "embedding.position_embeddings.weight": read.get(f"{pre}wpe.weight", (a["max_position_embeddings"], h)),
               "decoder.final_layernorm.weight": read.get(f"{pre}ln_f.weight", (h,)),
               "decoder.final_layernorm.bias": read.get(f"{pre}ln_f.bias", (h,))}
        for i in range(a["num_layers"]):
            p, m = f"{pre}h.{i}.", f"decoder.layers.{i}."
            w = read.get(f"{p}attn.c_attn.weight", (h, 3 * h)).t()  # Conv1D: [in, out]
            b = read.get(f"{p}attn.c_attn.bias", (3 * h,))
            out[f"{m}self_attention.linear_qkv.weight"] = qkv_to_megatron(*w.split(h), heads, heads, d)
            out[f"{m}self_attention.linear_qkv.bias"] = qkv_to_megatron(*b.split(h), heads, heads, d)
            out[f"{m}self_attention.linear_proj.weight"] = read.get(f"{p}attn.c_proj.weight", (h, h)).t().contiguous()
            out[f"{m}self_attention.linear_proj.bias"] = read.get(f"{p}attn.c_proj.bias", (h,))
            for hf_norm, mg_norm in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                out[f"{m}{mg_norm}.weight"] = read.get(f"{p}{hf_norm}.weight", (h,))
                out[f"{m}{mg_norm}.bias"] = read.get(f"{p}{hf_norm}.bias", (h,))
            out[f"{m}mlp.linear_fc1.weight"] = read.get(f"{p}mlp.c_fc.weight", (h, f)).t().contiguous()
            out[f"{m}mlp.linear_fc1.bias"] = read.get(f"{p}mlp.c_fc.bias", (f,))
            out[f"{m}mlp.linear_fc2.weight"] = read.get(f"{p}mlp.c_proj.weight", (f, h)).t().contiguous()
            out[f"{m}mlp.linear_fc2.bias"] = read.get(f"{p}mlp.c_proj.bias", (h,))
        if "lm_head.weight" in read:
            read.get("lm_head.weight", (v, h))
        return out

    def unsupported(self, a: dict) -> list[str]:
        bad = _mismatch(a, normalization="LayerNorm", activation="gelu", add_bias_linear=True,
                        position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True)
        if a.get("num_query_groups") not in (None, a.get("num_attention_heads")):
            bad.append(f"num_query_groups={a.get('num_query_groups')!r} (GPT-2 has no grouped-query attention)")
        return bad

    def hf_config(self, a: dict) -> dict:
        h = a["hidden_size"]
        act = "gelu_new" if a.get("gelu_approximate", "none") == "tanh" else "gelu"
        return dict(
            architectures=list(self.architectures), model_type=self.name, activation_function=act,
            n_embd=h, n_layer=a["num_layers"], n_head=a["num_attention_heads"],
            n_inner=None if a["ffn_hidden_size"] == 4 * h else a["ffn_hidden_size"], vocab_size=a["vocab_size"],
            n_positions=a["max_position_embeddings"], layer_norm_epsilon=float(a["layernorm_epsilon"]),
            attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False,
            tie_word_embeddings=True, initializer_range=float(a.get("init_method_std", 0.02)),
        )

    def export(self, state: dict[str, torch.Tensor], a: dict) -> dict[str, torch.Tensor]:
        h, heads = a["hidden_size"], a["num_attention_heads"]
        d = h // heads
        t = "transformer."
        out = {f"{t}wte.weight": state["embedding.word_embeddings.weight"],
               f"{t}wpe.weight": state["embedding.position_embeddings.weight"],
               f"{t}ln_f.weight": state["decoder.final_layernorm.weight"],
               f"{t}ln_f.bias": state["decoder.final_layernorm.bias"]}
        for i in range(a["num_layers"]):
            p, m = f"{t}h.{i}.", f"decoder.layers.{i}."
            w = torch.cat(qkv_from_megatron(state[f"{m}self_attention.linear_qkv.weight"], heads, heads, d))
            out[f"{p}attn.c_attn.weight"] = w.t().contiguous()  # Conv1D: [in, out]
            out[f"{p}attn.c_attn.bias"] = torch.cat(
                qkv_from_megatron(state[f"{m}self_attention.linear_qkv.bias"], heads, heads, d))
            out[f"{p}attn.c_proj.weight"] = state[f"{m}self_attention.linear_proj.weight"].t().contiguous()
            out[f"{p}attn.c_proj.bias"] = state[f"{m}self_attention.linear_proj.bias"]
            for hf_norm, mg_norm in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                out[f"{p}{hf_norm}.weight"] = state[f"{m}{mg_norm}.weight"]
                out[f"{p}{hf_norm}.bias"] = state[f"{m}{mg_norm}.bias"]
            out[f"{p}mlp.c_fc.weight"] = state[f"{m}mlp.linear_fc1.weight"].t().contiguous()
            out[f"{p}mlp.c_fc.bias"] = state[f"{m}mlp.linear_fc1.bias"]
            out[f"{p}mlp.c_proj.weight"] = state[f"{m}mlp.linear_fc2.weight"].t().contiguous()
            out[f"{p}mlp.c_proj.bias"] = state[f"{m}mlp.linear_fc2.bias"]
        return out


ADAPTERS: tuple[Adapter, ...] = (LlamaAdapter(), MistralAdapter(), Qwen2Adapter(), GPT2Adapter())


def supported_architectures() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.architectures]


def adapter_for(hf: dict) -> Adapter:
    names = hf.get("architectures") or []
    for adapter in ADAPTERS:
        if any(n in adapter.architectures for n in names):
            return adapter
    named = names or f"{hf.get('model_type')!r} (model_type; config.json lists no architectures)"
    raise ValueError(f"unsupported architecture {named}; supported: {supported_architectures()}")


# --------------------------------------------------------------------------------------------- conversion
def _tokenizer(src: Path, out_dir: Path) -> tuple[Path, int]:
    """The checkpoint's tokenizer.json, with nemo_ee's special tokens (EETokenizer needs them) appended as
    added tokens if it lacks them. Returns (path of the tokenizer to embed, number of ids it has)."""
    from tokenizers import AddedToken, Tokenizer

    from nemo_ee.data.tokenizer import SPECIAL_TOKENS

    tok = Tokenizer.from_file(str(src))
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True) for t in missing])
    size = tok.get_vocab_size(with_added_tokens=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path, size


def load_hf_config(hf_dir: str | Path) -> dict:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory {hf_dir} does not exist")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    return json.loads(path.read_text())


def convert_hf_state(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(EarlyExitConfig fields, megatron state dict) of an HF checkpoint directory."""
    hf_dir = Path(hf_dir)
    hf = load_hf_config(hf_dir)
    adapter = adapter_for(hf)
    arch = adapter.arch(hf)
    read = SafetensorsReader(hf_dir)
    state = adapter.convert(read, arch)
    unused = sorted(k for k in read.keys() - read.used if not adapter.ignored.match(k))
    if unused:
        raise ValueError(f"{adapter.name}: HF tensors the importer does not map: {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    return arch, state


def is_exit_field(name: str) -> bool:
    """EarlyExitConfig fields that describe the exit heads (what ``early_exits.json`` carries)."""
    return name.startswith("exit_") or name == "tie_exit_output"


def read_exits(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(EarlyExitConfig exit fields, ``exits.*`` megatron tensors) from the side files an export wrote next to
    the HF checkpoint; ``({}, {})`` when there are none. Both files or neither."""
    hf_dir = Path(hf_dir)
    cfg_path, w_path = hf_dir / EXITS_CONFIG, hf_dir / EXITS_WEIGHTS
    if not cfg_path.is_file() and not w_path.is_file():
        return {}, {}
    if not (cfg_path.is_file() and w_path.is_file()):
        raise FileNotFoundError(f"{hf_dir} has {cfg_path.name if cfg_path.is_file() else w_path.name} but not "
                                f"{w_path.name if cfg_path.is_file() else cfg_path.name}: exit heads need both")
    from safetensors.torch import load_file

    fields = json.loads(cfg_path.read_text())
    if not isinstance(fields, dict) or not isinstance(fields.get("exit_layer_nums"), list):
        raise ValueError(f"{cfg_path} has no exit_layer_nums list")
    other = sorted(k for k in fields if not is_exit_field(k))
    if other:
        raise ValueError(f"{cfg_path} sets fields that are not exit fields: {other}")
    state = load_file(str(w_path))
    bad = sorted(k for k in state if not k.startswith("exits."))
    if bad:
        raise ValueError(f"{w_path} holds tensors outside exits.*: {bad[:8]}")
    return fields, state


def _pad_vocab(arch: dict, state: dict, size: int) -> None:
    """Grow the vocabulary to ``size`` rows (for appended special tokens): new rows = the mean row."""
    old = arch["vocab_size"]
    heads = [k for k in state if k.startswith("exits.") and k.endswith("output_layer.weight")]
    for key in ("embedding.word_embeddings.weight", "output_layer.weight", *heads):
        if key in state:
            w = state[key]
            state[key] = torch.cat([w, w.mean(0, keepdim=True).expand(size - old, -1)])
    arch["vocab_size"] = size


def convert_hf_to_nemo(hf_dir: str | Path, out: str | Path, seed: int = 1234) -> Path:
    """Convert an HF checkpoint directory into a .nemo of EarlyExitGPTNeMoModel. Returns ``out``.

    No exits, unless the directory holds the side files ``early_exits.json`` + ``early_exits.safetensors``
    written by :mod:`nemo_ee.checkpoint.hf_export`: then the exit heads are restored too."""
    import tempfile

    from omegaconf import OmegaConf

    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    hf_dir, out = Path(hf_dir), Path(out)
    arch, state = convert_hf_state(hf_dir)
    exit_fields, exit_state = read_exits(hf_dir)
    state.update(exit_state)
    tok_src = hf_dir / "tokenizer.json"
    if not tok_src.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {hf_dir} (a HF `tokenizers` file is needed)")
    with tempfile.TemporaryDirectory() as tmp:
        tok_path, tok_size = _tokenizer(tok_src, Path(tmp))
        if tok_size > arch["vocab_size"]:
            _pad_vocab(arch, state, tok_size)
        cfg = OmegaConf.create({
            "seed": seed, "micro_batch_size": 1, "global_batch_size": 1,
            "tokenizer": {"vocab_size": tok_size, "tokenizer_file": str(tok_path), "cache_dir": None},
            "data": {"corpus_root": None, "val_fraction": 0.05, "max_files": None, "num_workers": 0},
            "optim": {"lr": 1.0e-4, "min_lr": 1.0e-5, "warmup_steps": 0, "decay_style": "cosine",
                      "weight_decay": 0.01, "clip_grad": 1.0},
            "arch": {**arch, "exit_layer_nums": [], **exit_fields, "tensor_model_parallel_size": 1,
                     "pipeline_model_parallel_size": 1},
        })
        model = EarlyExitGPTNeMoModel(cfg)
        expected = {k for k, v in model.model.state_dict().items() if v is not None and not k.endswith("_extra_state")}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(f"converted state does not match the model: missing {missing}, unexpected {extra}")
        params = model.model.state_dict()
        for key, value in state.items():
            if tuple(params[key].shape) != tuple(value.shape):
                raise ValueError(f"converted {key} has shape {list(value.shape)}, model expects "
                                 f"{list(params[key].shape)}")
        model.model.load_state_dict(state, strict=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save_to(str(out))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face transformers checkpoint (config.json, *.safetensors, tokenizer.json) "
                    "into a .nemo of EarlyExitGPTNeMoModel (with exit heads only if the directory holds the early_exits.json + "
                    "early_exits.safetensors side files of convert_nemo_to_hf.py). Supported architectures: "
                    + ", ".join(supported_architectures()) + ".",
    )
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json, *.safetensors, "
                        "tokenizer.json); weights are read with safetensors only")
    parser.add_argument("--out", required=True, help="path of the .nemo file to write")
    parser.add_argument("--seed", type=int, default=1234, help="seed recorded in the model config (default 1234)")
    args = parser.parse_args(argv)
    path = convert_hf_to_nemo(args.hf_dir, args.out, seed=args.seed)
    print(f"wrote {path}")
