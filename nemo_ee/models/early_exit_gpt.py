"""EarlyExitGPTModel: megatron-core's GPTModel plus exit heads on the layers of this pipeline stage.

The backbone is megatron's own ``GPTModel`` (embedding, ``TransformerBlock``, output layer), untouched.
Exits read the hidden states of their layers through forward hooks on the block's layers, so
megatron's forward, recompute-free schedules and checkpoints all stay upstream code.
"""
from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from nemo_ee.compat import mcore
from nemo_ee.config import EarlyExitConfig
from nemo_ee.models.exit_head import ExitHead, vocab_parallel_max_prob
from nemo_ee.models.losses import token_weighted_ce

# The keyword arguments a TransformerLayer receives that an exit block layer also needs.
_LAYER_KWARGS = (
    "attention_mask", "rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin",
    "attention_bias", "inference_context", "packed_seq_params", "sequence_len_offset", "padding_mask",
)


class _StopForward(Exception):
    """Raised by the deepest exit's hook to end a forward that only needs the exits."""


class EarlyExitOutput(NamedTuple):
    """What the model returns.

    ``output``: the final per-token loss [b, s] (labels given), the final logits [b, s, v] (no labels),
    or the stage's hidden states [s, b, h] on a stage without the output layer.
    ``exits``: global exit index -> that exit's per-token loss [b, s] or logits [b, s, v].
    """

    output: torch.Tensor
    exits: dict


class EarlyExitGPTModel(GPTModel):
    """GPTModel with the exits of ``ee_config`` that live on this pipeline stage."""

    def __init__(
        self,
        config: TransformerConfig,
        ee_config: EarlyExitConfig,
        transformer_layer_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        pg_collection: Any = None,
        vp_stage: Optional[int] = None,
    ) -> None:
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=ee_config.share_embeddings_and_output_weights,
            position_embedding_type=ee_config.position_embedding_type,
            rotary_base=ee_config.rotary_base,
            rope_scaling=ee_config.rope_scaling,
            rope_scaling_factor=ee_config.rope_scaling_factor,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.ee_config = ee_config
        self.layer_offset = get_transformer_layer_offset(config, vp_stage)
        self.num_local_layers = len(self.decoder.layers)
        self.exits = torch.nn.ModuleDict()
        for index, layer in enumerate(ee_config.exit_layer_nums):
            if self._owns_point(ee_config.exit_point(layer)):
                self.exits[str(index)] = ExitHead(
                    config, ee_config, transformer_layer_spec, self.decoder.submodules.layer_norm, index,
                    vocab_size, parallel_output, self.pg_collection, vp_stage,
                )
        self._captured: dict[int, tuple[torch.Tensor, dict]] = {}
        self._stop_after: Optional[int] = None
        self._install_hooks()
        self.exit_word_embeddings = None
        if ee_config.tie_exit_output and len(self.exits) and not (pre_process or post_process):
            self._add_middle_stage_embedding()

    # ------------------------------------------------------------------ tied exits on middle stages
    def _add_middle_stage_embedding(self) -> None:
        """A copy of the word embedding for tied exits on a stage that is neither first nor last.

        megatron keeps such copies in sync through its embedding group: zero-initialised here, then
        all-reduced from the first stage by ``setup_embeddings_and_output_layer``, and their gradients
        all-reduced by ``finalize_model_grads``. The group must include this stage
        (``initialize_distributed(..., embedding_stages=EarlyExitConfig.embedding_stages)``).
        """
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        group = parallel_state.get_embedding_group(check_initialized=False)
        if group is None or torch.distributed.get_rank() not in torch.distributed.get_process_group_ranks(group):
            raise ValueError(
                f"pipeline stage {parallel_state.get_pipeline_model_parallel_rank()} holds tied exits but is not "
                "in megatron's embedding group: initialise with "
                "initialize_distributed(..., embedding_stages=ee_config.embedding_stages)"
            )
        tp = parallel_state.get_tensor_model_parallel_world_size()
        weight = torch.nn.Parameter(
            torch.zeros(self.vocab_size // tp, self.config.hidden_size, dtype=self.config.params_dtype)
        )
        set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=0, stride=1)
        weight.shared = True
        weight.shared_embedding = True
        weight.is_embedding_or_output_parameter = True
        self.exit_word_embeddings = weight
        self.setup_embeddings_and_output_layer()  # joins the first stage's all-reduce of the embedding

    def shared_embedding_or_output_weight(self) -> Optional[torch.Tensor]:
        """megatron's shared word-embedding weight, or this middle stage's copy of it for tied exits."""
        if self.pre_process or self.post_process or getattr(self, "exit_word_embeddings", None) is None:
            return super().shared_embedding_or_output_weight()
        return self.exit_word_embeddings

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's sharded state dict; a middle stage's embedding copy is a replica of the first stage's."""
        from megatron.core import parallel_state
        from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # megatron recurses only through MegatronModules: below the exits' ModuleDict every tensor would be
        # a plain replicated one (TP shards saved as whole tensors). Take each head's own sharded state dict.
        sharded = {k: v for k, v in sharded.items() if not k.startswith(f"{prefix}exits.")}
        for index, head in self.exits.items():
            sharded.update(head.sharded_state_dict(f"{prefix}exits.{index}.", sharded_offsets, metadata))
        key = f"{prefix}exit_word_embeddings"
        if key in sharded:
            sharded[key] = make_tp_sharded_tensor_for_checkpoint(
                tensor=self.exit_word_embeddings,
                key=f"{prefix}embedding.word_embeddings.weight",
                replica_id=(2, 0, parallel_state.get_data_parallel_rank(with_context_parallel=True)),
                allow_shape_mismatch=True,
            )
        return sharded

    # ------------------------------------------------------------------ placement
    def _owns_point(self, point: int) -> bool:
        """Whether the hidden state after ``point`` backbone layers is computed on this stage."""
        if point == 0:
            return self.pre_process
        return self.layer_offset < point <= self.layer_offset + self.num_local_layers

    @property
    def local_exit_indices(self) -> list[int]:
        """Global indices of the exits on this stage, in order."""
        return sorted(int(k) for k in self.exits.keys())

    def _install_hooks(self) -> None:
        for key, head in self.exits.items():
            index, point = int(key), head.point
            if point == self.layer_offset:  # the stage's input: the first layer's input
                self.decoder.layers[0].register_forward_pre_hook(self._pre_hook(index), with_kwargs=True)
            else:
                layer = self.decoder.layers[point - self.layer_offset - 1]
                layer.register_forward_hook(self._post_hook(index), with_kwargs=True)

    def _pre_hook(self, index: int):
        def hook(_module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._captured[index] = (hidden, {k: kwargs.get(k) for k in _LAYER_KWARGS if k in kwargs})
            if self._stop_after == index:
                raise _StopForward

        return hook

    def _post_hook(self, index: int):
        def hook(_module, _args, kwargs, output):
            self._captured[index] = (output[0], {k: kwargs.get(k) for k in _LAYER_KWARGS if k in kwargs})
            if self._stop_after == index:
                raise _StopForward

        return hook

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        decoder_input: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        **kwargs: Any,
    ) -> EarlyExitOutput:
        """Backbone forward (megatron's), then the exits of this stage on the captured hidden states."""
        self._captured = {}
        try:
            output = super().forward(
                input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
                runtime_gather_output=runtime_gather_output, **kwargs,
            )
            exits = self._exit_outputs(labels, runtime_gather_output)
        finally:
            self._captured = {}
        return EarlyExitOutput(output, exits)

    def forward_exits_only(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        frozen_backbone: bool = False,
    ) -> dict:
        """This stage's exits only: the layers after the deepest local exit are not run.

        First stage only (it needs the token input). Returns {exit index: per-token loss or logits}.
        ``frozen_backbone`` (EE-Tuning): the backbone runs under ``torch.no_grad`` and the exits read
        detached hidden states, so autograd records (and saves activations for) the exit heads only.
        """
        if not self.pre_process:
            raise ValueError("forward_exits_only runs on the first pipeline stage, which holds the embedding")
        if not len(self.exits):
            return {}
        deepest = max(self.local_exit_indices, key=lambda i: self.exits[str(i)].point)
        self._captured, self._stop_after = {}, deepest
        try:
            with torch.no_grad() if frozen_backbone else contextlib.nullcontext():
                try:
                    super().forward(input_ids, position_ids, None)
                except _StopForward:
                    pass
            if frozen_backbone:
                self._captured = {i: (h.detach(), kw) for i, (h, kw) in self._captured.items()}
            return self._exit_outputs(labels, None)
        finally:
            self._captured, self._stop_after = {}, None

    def forward_frozen_stage(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: torch.Tensor,
        labels: torch.Tensor,
        run_to_end: bool = True,
    ) -> tuple[Optional[torch.Tensor], dict]:
        """EE-Tuning on any pipeline stage: backbone under ``no_grad``, this stage's exits on detached inputs.

        A non-first stage reads the hidden state given to ``set_input_tensor``. Returns (the stage's output
        hidden state [s, b, h] with no autograd history, or None when ``run_to_end`` is False and the forward
        stopped after the deepest local exit; {exit index: per-token loss}).
        """
        stop = None
        if not run_to_end and len(self.exits):
            stop = max(self.local_exit_indices, key=lambda i: self.exits[str(i)].point)
        self._captured, self._stop_after = {}, stop
        output = None
        try:
            with torch.no_grad():
                try:
                    output = super().forward(input_ids, position_ids, None)
                except _StopForward:
                    pass
            self._captured = {i: (h.detach(), kw) for i, (h, kw) in self._captured.items()}
            return output, self._exit_outputs(labels, None)
        finally:
            self._captured, self._stop_after = {}, None

    def forward_frozen_with_final(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        """EE-Tuning by distillation (one stage holding the whole model): the whole backbone under ``torch.no_grad``.

        Every layer, the final norm and the output layer run. Returns (the final logits [b, s, v], no autograd
        history; {exit index: a function of no argument returning that exit's raw logits [b, s, v], with autograd
        through the exit head only}). Each exit is computed when its function is called, so a caller can
        back-propagate one exit before the next one's logits exist.
        """
        if not (self.pre_process and self.post_process):
            raise ValueError("forward_frozen_with_final needs the whole model on one stage (embedding to output layer)")
        self._captured, self._stop_after = {}, None
        try:
            with torch.no_grad():
                final = super().forward(input_ids, position_ids, None)
            captured = {i: (h.detach(), kw) for i, (h, kw) in self._captured.items()}
        finally:
            self._captured = {}
        shared = self.shared_embedding_or_output_weight() if self.ee_config.tie_exit_output else None

        def exit_logits(index: int) -> torch.Tensor:
            hidden, layer_kwargs = captured[index]
            return self.exits[str(index)](hidden, layer_kwargs, shared, None).transpose(0, 1).contiguous()

        return final, {i: (lambda i=i: exit_logits(i)) for i in self.local_exit_indices}

    def _exit_outputs(self, labels: Optional[torch.Tensor], runtime_gather_output: Optional[bool]) -> dict:
        shared = None
        if self.ee_config.tie_exit_output and len(self.exits):
            shared = self.shared_embedding_or_output_weight()
        results = {}
        for index in self.local_exit_indices:
            head = self.exits[str(index)]
            hidden, layer_kwargs = self._captured[index]
            logits = head(hidden, layer_kwargs, shared, runtime_gather_output)
            results[index] = self._exit_result(head, logits, labels)
        return results

    def _exit_result(self, head: ExitHead, logits: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        if self.training and head.temperature != 1.0:
            logits = logits / head.temperature
        max_prob = None
        if self.training and head.dynamic_token_weight:
            # Before the CE: megatron's vocab-parallel cross entropy overwrites fp32 logits with the softmax.
            max_prob = vocab_parallel_max_prob(logits, self.pg_collection.tp).transpose(0, 1)
        ce = self.compute_language_model_loss(labels, logits)
        return token_weighted_ce(ce, max_prob)


def layer_spec(ee_config: EarlyExitConfig) -> ModuleSpec:
    """megatron's transformer-engine layer spec when TE is importable (and allowed), else the local one.

    ``qk_layernorm`` (Qwen3): megatron's own spec builders with ``qk_layernorm=True``, which put a norm of the
    layer's normalization type over each head's query and key (before RoPE). Exit blocks share this spec."""
    return mcore.gpt_layer_spec(ee_config.use_transformer_engine, ee_config.normalization, ee_config.qk_layernorm)


def build_model(
    ee_config: EarlyExitConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    **config_overrides: Any,
) -> EarlyExitGPTModel:
    """Build this rank's stage of the model; megatron's parallel_state must be initialised."""
    from megatron.core import parallel_state

    if ee_config.sequence_parallel and not ee_config.use_transformer_engine:
        raise ValueError(
            "sequence_parallel=True needs transformer-engine (pip install -e '.[gpu]'): megatron's local "
            "layer spec has no sequence-parallel norm"
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return EarlyExitGPTModel(
        config=ee_config.transformer_config(**config_overrides),
        ee_config=ee_config,
        transformer_layer_spec=layer_spec(ee_config),
        vocab_size=ee_config.vocab_size,
        max_sequence_length=ee_config.max_positions,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
