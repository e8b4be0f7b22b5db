"""megatron-core's transformer layer, MLP and output layer as plain tensor ops, for decoding at TP=1.

A decode step at batch 1 is memory-bound: it should cost the bytes of weights it reads. Through megatron's
modules a layer of SmolLM2-135M cost about 1.15 ms on this machine's CPU, of which about 0.74 ms was Python
and dispatch: the parallel linears' autograd functions and region copies, viewless-tensor wrappers,
bias-dropout-add closures. At TP=1 under ``torch.no_grad`` none of that does anything.

:class:`FastLayer` runs the same computation straight from the module's own parameters (read by reference,
never copied, so a weight update or a reload is seen at once): the layer's own norm modules, then
``F.linear`` on ``linear_qkv``'s weight, megatron's q/k/v split of the grouped layout, q/k norms, rotary
embedding (the non-interleaved form megatron applies), the attention callback, ``linear_proj``, residual,
pre-MLP norm, the MLP (gated or not, megatron's clamp and linear offset), residual. :func:`fast_path_problem`
says why a model cannot take this path (TP>1, transformer-engine or MoE layers, options it does not
reproduce); the engine then runs megatron's modules as before. Tests compare both paths' logits and tokens.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import get_pg_size

# (q [n, R, heads, d], k [n, R, groups, d], v [n, R, groups, d]) -> context [n, R, heads * d]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_CONFIG_OFF = ("apply_residual_connection_post_layernorm", "rotary_interleaved", "use_te_activation_func",
               "attention_output_gate", "multi_latent_attention", "fp8", "fp4")


def _linear_problem(module: torch.nn.Module, kinds: tuple, name: str) -> Optional[str]:
    if type(module) not in kinds:
        return f"{name} is {type(module).__name__}, not megatron's local {kinds[0].__name__}"
    world = get_pg_size(getattr(module, "tp_group", None))
    if world != 1:
        return f"{name} is split over tensor parallelism (TP={world})"
    return None


def mlp_problem(mlp: torch.nn.Module, name: str = "mlp") -> Optional[str]:
    """Why ``mlp`` cannot run as :func:`fast_mlp` (None: it can)."""
    if type(mlp) is not MLP:
        return f"{name} is {type(mlp).__name__}, not megatron's dense MLP"
    for sub, kinds in (("linear_fc1", (ColumnParallelLinear,)), ("linear_fc2", (RowParallelLinear,))):
        problem = _linear_problem(getattr(mlp, sub), kinds, f"{name}.{sub}")
        if problem:
            return problem
    if mlp.config.activation_func not in (F.silu, F.gelu):
        return f"{name}'s activation {mlp.config.activation_func} is not silu or gelu"
    return None


def layer_problem(layer: torch.nn.Module) -> Optional[str]:
    """Why a transformer layer cannot run as a :class:`FastLayer` (None: it can)."""
    if type(layer) is not TransformerLayer:
        return f"layer is {type(layer).__name__}, not megatron's TransformerLayer"
    config = layer.config
    for key in _CONFIG_OFF:
        if getattr(config, key, None):
            return f"config.{key}={getattr(config, key)!r} is not reproduced by the fast path"
    if getattr(config, "mrope_section", None) is not None:
        return "mRoPE is not reproduced by the fast path"
    attn = layer.self_attention
    if type(attn) is not SelfAttention:
        return f"self_attention is {type(attn).__name__}, not megatron's SelfAttention"
    if not isinstance(layer.cross_attention, IdentityOp):
        return "the layer has cross-attention"
    for module, name in ((layer.input_layernorm, "input_layernorm"), (layer.pre_mlp_layernorm, "pre_mlp_layernorm")):
        if isinstance(module, IdentityOp):
            return f"{name} is fused into the next linear (transformer-engine), not a module of its own"
    for sub, kinds in (("linear_qkv", (ColumnParallelLinear,)), ("linear_proj", (RowParallelLinear,))):
        problem = _linear_problem(getattr(attn, sub), kinds, f"self_attention.{sub}")
        if problem:
            return problem
    return mlp_problem(layer.mlp)


def fast_mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """megatron's :class:`MLP` forward (output bias included) from its parameters."""
    config = mlp.config
    h = F.linear(x, mlp.linear_fc1.weight, mlp.linear_fc1.bias)
    if config.gated_linear_unit:
        gate, linear = torch.chunk(h, 2, dim=-1)
        clamp = getattr(config, "activation_func_clamp_value", None)
        if clamp is not None:
            gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
        offset = getattr(config, "glu_linear_offset", 0.0) or 0.0
        h = config.activation_func(gate) * (linear + offset if offset else linear)
    else:
        h = config.activation_func(h)
    return F.linear(h, mlp.linear_fc2.weight, mlp.linear_fc2.bias)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` channels of ``t`` (megatron's non-interleaved form)."""
    rot = cos.shape[-1]
    head, rest = (t, None) if rot == t.shape[-1] else (t[..., :rot], t[..., rot:])
    x1, x2 = torch.chunk(head, 2, dim=-1)
    out = head * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


class FastLayer:
    """One :class:`TransformerLayer` (or an exit block) run from its own parameters; see the module docstring."""

    def __init__(self, layer: torch.nn.Module) -> None:
        problem = layer_problem(layer)
        if problem:
            raise ValueError(f"layer {getattr(layer, 'layer_number', '?')} cannot take the fast path: {problem}")
        attn = layer.self_attention
        self.layer = layer
        self.heads = attn.num_attention_heads_per_partition
        self.groups = attn.num_query_groups_per_partition
        self.head_dim = attn.hidden_size_per_attention_head
        self.split = [self.heads // self.groups * self.head_dim, self.head_dim, self.head_dim]
        self.q_norm = None if isinstance(attn.q_layernorm, IdentityOp) else attn.q_layernorm
        self.k_norm = None if isinstance(attn.k_layernorm, IdentityOp) else attn.k_layernorm

    def __call__(self, x: torch.Tensor, attend: Attend, cos: Optional[torch.Tensor] = None,
                 sin: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [n, R, h] -> [n, R, h]; ``cos``/``sin`` [n, R, 1, rot_dim] for rotary models."""
        layer = self.layer
        attn = layer.self_attention
        n, r = x.shape[0], x.shape[1]
        qkv = F.linear(layer.input_layernorm(x), attn.linear_qkv.weight, attn.linear_qkv.bias)
        q, k, v = qkv.view(n, r, self.groups, -1).split(self.split, dim=3)
        q = q.reshape(n, r, self.heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if cos is not None:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = F.linear(attend(q, k, v), attn.linear_proj.weight)
        bias = attn.linear_proj.bias
        x = x + (out if bias is None else out + bias)
        return x + fast_mlp(layer.mlp, layer.pre_mlp_layernorm(x))


def output_problem(output_layer: torch.nn.Module) -> Optional[str]:
    """Why an output layer cannot be a plain ``F.linear`` (None: it can)."""
    return _linear_problem(output_layer, (ColumnParallelLinear,), "output layer")


def fast_logits(output_layer: torch.nn.Module, hidden: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The output layer's logits (float32): ``weight`` when tied to the embedding, else its own."""
    return F.linear(hidden, output_layer.weight if weight is None else weight, output_layer.bias).float()
