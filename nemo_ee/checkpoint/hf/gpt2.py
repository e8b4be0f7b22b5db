"""HF GPT-2 <-> megatron GPTModel (learned positions, LayerNorm, tanh GELU, biases, Conv1D weights)."""
from __future__ import annotations

import re

import torch

from nemo_ee.checkpoint.hf.common import (
    Adapter,
    SafetensorsReader,
    _mismatch,
    _need,
    _reject,
    qkv_from_megatron,
    qkv_to_megatron,
)


class GPT2Adapter(Adapter):
    """GPT-2: learned positions, LayerNorm, gelu_new (tanh GELU), biases everywhere, Conv1D ([in, out]) weights."""

    name = "gpt2"
    architectures = ("GPT2LMHeadModel",)
    model_types = ("gpt2",)
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
        if a.get("kv_channels") not in (None, a["hidden_size"] // a["num_attention_heads"]):
            bad.append(f"kv_channels={a.get('kv_channels')!r} (GPT-2 heads are n_embd / n_head wide)")
        if a.get("qk_layernorm"):
            bad.append(f"qk_layernorm={a.get('qk_layernorm')!r} (needs False)")
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
