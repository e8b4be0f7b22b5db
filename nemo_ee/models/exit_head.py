"""One exit head: [transformer layer] -> [residual MLP] -> [norm] -> output projection.

Every part comes from the backbone's own megatron-core layer spec, so an exit is built of the
same modules (local or transformer-engine) as the layers it sits beside. The norm is last so that
an exit copied from the final norm and output layer reproduces the final logits exactly.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from nemo_ee.config import EarlyExitConfig


class ExitHead(MegatronModule):
    """The exit reading the hidden state after ``point`` backbone layers (configured at ``layer_num``)."""

    def __init__(
        self,
        config: TransformerConfig,
        ee_config: EarlyExitConfig,
        layer_spec: ModuleSpec,
        norm_spec: Any,
        index: int,
        vocab_size: int,
        parallel_output: bool,
        pg_collection: Any,
        vp_stage: Optional[int] = None,
    ) -> None:
        super().__init__(config=config)
        self.index = index
        self.layer_num = ee_config.exit_layer_nums[index]
        self.point = ee_config.exit_point(self.layer_num)
        self.tied = ee_config.tie_exit_output
        self.temperature = float(ee_config.per_exit("exit_logit_temperature")[index])
        self.dynamic_token_weight = bool(ee_config.per_exit("exit_dynamic_token_weight")[index])
        h, eps = config.hidden_size, config.layernorm_epsilon
        tp_group = pg_collection.tp

        self.block = None
        if ee_config.exit_block:
            # A layer number past the backbone's gives the exit block its own (KV-cache) identity.
            own_number = config.num_layers + 1 + index
            offset = get_transformer_layer_offset(config, vp_stage)
            self.block = build_module(
                layer_spec, config=config, layer_number=own_number - offset, pg_collection=pg_collection
            )
        self.mlp_norm = self.mlp = None
        if ee_config.exit_mlp:
            subs = layer_spec.submodules
            self.mlp_norm = build_module(subs.pre_mlp_layernorm, config=config, hidden_size=h, eps=eps)
            self.mlp = build_module(subs.mlp, config=config, tp_group=tp_group)
        self.norm = build_module(norm_spec, config=config, hidden_size=h, eps=eps) if ee_config.exit_norm else None
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            h,
            vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=not parallel_output,
            skip_weight_param_allocation=self.tied,
            tp_group=tp_group,
        )

    def hidden(self, hidden_states: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        """The head's last hidden state (before the output projection), [s, b, h]."""
        if self.block is not None:
            hidden_states, _ = self.block(hidden_states=hidden_states, **layer_kwargs)
        return self.tail(hidden_states)

    def tail(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What follows the exit block: residual MLP, then norm (the decoder runs the block itself)."""
        if self.mlp is not None:
            out, bias = self.mlp(self.mlp_norm(hidden_states))
            hidden_states = hidden_states + (out if bias is None else out + bias)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return hidden_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer_kwargs: dict,
        shared_weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ) -> torch.Tensor:
        """Exit logits [s, b, v/tp] (or full vocab when gathered)."""
        if self.tied and shared_weight is None:
            raise ValueError(f"exit at layer {self.layer_num} is tied but no shared embedding weight was given")
        logits, _ = self.output_layer(
            self.hidden(hidden_states, layer_kwargs),
            weight=shared_weight if self.tied else None,
            runtime_gather_output=runtime_gather_output,
        )
        return logits


def vocab_parallel_max_prob(logits: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """Max softmax probability over a vocabulary split across the TP group (no gradient)."""
    with torch.no_grad():
        logits = logits.float()
        gmax = logits.max(dim=-1).values
        if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
            torch.distributed.all_reduce(gmax, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        sum_exp = torch.exp(logits - gmax.unsqueeze(-1)).sum(dim=-1)
        if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
            torch.distributed.all_reduce(sum_exp, group=tp_group)
        return 1.0 / sum_exp
