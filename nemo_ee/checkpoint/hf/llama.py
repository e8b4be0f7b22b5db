"""HF Llama 2/3, Mistral, Qwen2 and Qwen3 <-> megatron GPTModel (RMSNorm, SwiGLU, RoPE, grouped-query attention).

An explicit HF ``head_dim`` other than hidden_size / num_attention_heads is megatron's ``kv_channels``; Qwen3's
per-head q/k RMSNorm (``q_norm`` / ``k_norm``, before RoPE, eps = rms_norm_eps) is megatron's ``qk_layernorm``
(``self_attention.q_layernorm`` / ``k_layernorm``, eps = layernorm_epsilon).
"""
from __future__ import annotations

import re

import torch

from nemo_ee.checkpoint.hf.common import (
    Adapter,
    SafetensorsReader,
    _mismatch,
    _need,
    _reject,
    _rope,
    _rope_parameters,
    qkv_from_megatron,
    qkv_to_megatron,
)


def _head_dim(a: dict) -> int:
    """Per-head width of an arch dict: ``kv_channels``, or hidden_size / num_attention_heads."""
    return a.get("kv_channels") or a["hidden_size"] // a["num_attention_heads"]


class LlamaAdapter(Adapter):
    """Llama 2/3 (GQA, rope_theta, llama3 rope scaling, tied or untied output, any head_dim); base for Mistral,
    Qwen2 and Qwen3."""

    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    ignored = re.compile(r".*rotary_emb\.inv_freq$")
    qkv_bias = False
    qk_norm = False  # per-head q/k RMSNorm (Qwen3)

    def check(self, hf: dict) -> None:
        _reject(hf, self.name, hidden_act="silu", attention_bias=False, mlp_bias=False,
                pretraining_tp=lambda v: v in (None, 1))

    def arch(self, hf: dict) -> dict:
        self.check(hf)
        h, heads = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
        head_dim = hf.get("head_dim") or h // heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"{self.name}: config.json head_dim={head_dim!r} is not an integer >= 1")
        groups = hf.get("num_key_value_heads") or heads
        max_pos = int(_need(hf, "max_position_embeddings"))
        seq = min(max_pos, int(hf.get("sliding_window") or max_pos)) if self.sliding_window(hf) else max_pos
        return dict(
            num_layers=_need(hf, "num_hidden_layers"), hidden_size=h, num_attention_heads=heads,
            num_query_groups=None if groups == heads else groups,
            kv_channels=None if head_dim * heads == h else head_dim, ffn_hidden_size=_need(hf, "intermediate_size"),
            vocab_size=_need(hf, "vocab_size"), seq_length=seq, max_position_embeddings=max_pos,
            normalization="RMSNorm", activation="swiglu", add_bias_linear=False, add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_norm, position_embedding_type="rope", **_rope(hf, self.name),
            share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
            layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        )

    def sliding_window(self, hf: dict) -> bool:
        return False

    def convert(self, read: SafetensorsReader, a: dict) -> dict[str, torch.Tensor]:
        h, heads, f, v = a["hidden_size"], a["num_attention_heads"], a["ffn_hidden_size"], a["vocab_size"]
        groups = a["num_query_groups"] or heads
        d = _head_dim(a)
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
            if self.qk_norm:
                out[f"{m}self_attention.q_layernorm.weight"] = read.get(f"{p}self_attn.q_norm.weight", (d,))
                out[f"{m}self_attention.k_layernorm.weight"] = read.get(f"{p}self_attn.k_norm.weight", (d,))
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
        bad = _mismatch(a, normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                        add_qkv_bias=self.qkv_bias, position_embedding_type="rope")
        if bool(a.get("qk_layernorm", False)) != self.qk_norm:  # a missing key (an older arch) means False
            bad.append(f"qk_layernorm={a.get('qk_layernorm')!r} (needs {self.qk_norm!r})")
        return bad

    def hf_config(self, a: dict) -> dict:
        heads = a["num_attention_heads"]
        return dict(
            architectures=list(self.architectures), model_type=self.name, hidden_act="silu",
            hidden_size=a["hidden_size"], intermediate_size=a["ffn_hidden_size"],
            num_hidden_layers=a["num_layers"], num_attention_heads=heads,
            num_key_value_heads=a.get("num_query_groups") or heads, head_dim=_head_dim(a),
            vocab_size=a["vocab_size"], max_position_embeddings=a["max_position_embeddings"],
            rms_norm_eps=float(a["layernorm_epsilon"]), rope_parameters=_rope_parameters(a),
            tie_word_embeddings=bool(a["share_embeddings_and_output_weights"]), attention_dropout=0.0,
            initializer_range=float(a.get("init_method_std", 0.02)), **self.family_config(a),
        )

    def family_config(self, a: dict) -> dict:
        return dict(attention_bias=False, mlp_bias=False, pretraining_tp=1)

    def export(self, state: dict[str, torch.Tensor], a: dict) -> dict[str, torch.Tensor]:
        heads = a["num_attention_heads"]
        groups, d = a.get("num_query_groups") or heads, _head_dim(a)
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
            if self.qk_norm:
                out[f"{p}self_attn.q_norm.weight"] = state[f"{m}self_attention.q_layernorm.weight"]
                out[f"{p}self_attn.k_norm.weight"] = state[f"{m}self_attention.k_layernorm.weight"]
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
    model_types = ("mistral",)

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
    model_types = ("qwen2",)
    qkv_bias = True

    def check(self, hf: dict) -> None:
        _reject(hf, self.name, hidden_act="silu", use_sliding_window=lambda v: not v)

    def family_config(self, a: dict) -> dict:
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=a["num_layers"],
                    layer_types=["full_attention"] * a["num_layers"])


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: Llama layout (no q/k/v bias) with a per-head RMSNorm on q and k before RoPE (megatron's
    ``qk_layernorm``); head_dim is usually not hidden_size / num_attention_heads (megatron's ``kv_channels``).

    Rejected: sliding-window attention (``use_sliding_window`` or any ``layer_types`` entry other than
    ``full_attention``) and ``attention_bias=True`` (HF then biases q/k/v *and* o_proj but not the MLP, which no
    megatron bias setting reproduces)."""

    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    qk_norm = True

    def check(self, hf: dict) -> None:
        _reject(hf, self.name, hidden_act="silu", attention_bias=False, use_sliding_window=lambda v: not v,
                layer_types=lambda v: v is None or all(t == "full_attention" for t in v))

    def family_config(self, a: dict) -> dict:
        return dict(attention_bias=False, use_sliding_window=False, sliding_window=None,
                    max_window_layers=a["num_layers"], layer_types=["full_attention"] * a["num_layers"])
