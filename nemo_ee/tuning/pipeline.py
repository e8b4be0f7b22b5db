"""EE-Tuning with pipeline parallelism: a forward-only pipeline with a local exit backward on every stage.

The tuning model is the checkpoint's model cut after its last exit (:func:`tuning_config`), split over the
tuning pipeline size, which may be smaller (or larger) than the checkpoint's:

- each stage runs its backbone layers under ``torch.no_grad`` on the hidden state received from the
  previous stage, its own exits on detached copies of their inputs, and ``backward`` through those exits
  only (``EarlyExitGPTModel.forward_frozen_stage``);
- megatron's own schedule moves the activations: ``get_forward_backward_func()(..., forward_only=True)``
  sends each micro-batch's hidden state to the next stage with megatron's p2p; the schedule never runs a
  backward, so no gradient and no backward message crosses a stage;
- no final norm, no output layer and no layer after the last exit is built, loaded or run; the final
  loss is not computed;
- each stage's AdamW holds that stage's exit parameters only; gradients are clipped by the global norm
  (one all-reduce over the pipeline group); a stage without exits steps as a no-op (EE-LLM issue #12).

Loading reads only this stage's tensors: from a megatron dist checkpoint of the full model saved at any
pipeline layout (:func:`load_stage_from_dist`) or from a TP=PP=1 safetensors state dict such as the
weights inside a .nemo (:func:`load_stage_from_safetensors`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from nemo_ee.config import EarlyExitConfig
from nemo_ee.models.losses import ExitWeightSchedule, masked_sum, weighted_exit_sum
from nemo_ee.tuning.ee_tune import freeze_backbone

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LAYERS_PREFIX = "decoder.layers."


def tuning_config(ee_config: EarlyExitConfig, pipeline_model_parallel_size: int = 1) -> EarlyExitConfig:
    """The config of the EE-Tuning model: layers up to the last exit, TP=1, ``pipeline_model_parallel_size`` stages.

    The tuning model has no output layer, so the backbone's embedding/output tying is dropped (megatron would
    otherwise keep an embedding copy on the last stage); tied exits keep it.
    """
    if not ee_config.exit_layer_nums:
        raise ValueError("the model has no exits: nothing to tune (add them with scripts/add_exits.py)")
    pp = pipeline_model_parallel_size
    depth = max(ee_config.exit_layer_nums)
    allowed = [d for d in range(1, depth + 1) if depth % d == 0]
    if isinstance(pp, bool) or not isinstance(pp, int) or pp not in allowed:
        raise ValueError(f"pipeline_model_parallel_size={pp!r} must divide the {depth} layers up to the last exit "
                         f"(layer {depth}); allowed: {allowed}")
    cfg = dataclasses.replace(
        ee_config, num_layers=depth, tensor_model_parallel_size=1, pipeline_model_parallel_size=pp,
        sequence_parallel=False, share_embeddings_and_output_weights=ee_config.tie_exit_output,
    )
    if cfg.tie_exit_output and pp > 1 and cfg.exit_stage(depth) != pp - 1:
        raise ValueError(f"tied exits at pipeline_model_parallel_size={pp}: the last stage must hold the last exit "
                         f"(exit_position={cfg.exit_position!r} puts it on stage {cfg.exit_stage(depth)})")
    return cfg


def init_tuning_parallel(cfg: EarlyExitConfig, seed: int = 1234) -> None:
    """megatron's parallel state for the tuning layout: one process per pipeline stage (TP=DP=1)."""
    from nemo_ee.parallel.initialize import initialize_distributed

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.pipeline_model_parallel_size:
        raise ValueError(f"EE-Tuning runs one process per pipeline stage: the world size is {world} but "
                         f"pipeline_model_parallel_size={cfg.pipeline_model_parallel_size} "
                         f"(launch with torchrun --nproc_per_node {cfg.pipeline_model_parallel_size})")
    initialize_distributed(1, cfg.pipeline_model_parallel_size, seed, embedding_stages=cfg.embedding_stages)


def build_tuning_stage(cfg: EarlyExitConfig) -> torch.nn.Module:
    """This rank's stage of the tuning model (``cfg`` from :func:`tuning_config`): no final norm, no output layer."""
    from megatron.core import parallel_state

    from nemo_ee.models import build_model

    return build_model(cfg, pre_process=parallel_state.is_pipeline_first_stage(), post_process=False)


def _check_exits_match(model: torch.nn.Module, source: EarlyExitConfig, where: Any) -> None:
    cfg = model.ee_config
    for name in ("exit_layer_nums", "exit_position", "exit_norm", "exit_mlp", "exit_block", "tie_exit_output"):
        if getattr(source, name) != getattr(cfg, name):
            raise ValueError(f"{where}: {name}={getattr(source, name)!r} but the tuning model has {getattr(cfg, name)!r}")


# ------------------------------------------------------------------------------------------------ loading
def load_stage_from_dist(model: torch.nn.Module, ckpt_dir: Union[str, os.PathLike]) -> list[str]:
    """Load this stage of the tuning model from a dist checkpoint of the full model (any pipeline layout, TP=1).

    Only the tensors the stage holds are requested, so only their shards are read. megatron stacks the layers
    of a checkpoint into tensors with a leading layer axis of the full depth; the stage's request is widened
    to that depth and asks for its own layers' slices. Returns the loaded tensors' names, layer tensors with
    their global layer number (``decoder.layers.3.mlp.linear_fc1.weight``). Collective over the world.
    """
    from nemo_ee.checkpoint.dist import is_checkpoint, read_config
    from nemo_ee.compat import cpu

    cpu.apply()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject, ShardedTensor, ShardedTensorFactory, apply_factories, apply_factory_merges,
    )
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt_dir = Path(ckpt_dir).absolute()
    if not is_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete nemo_ee distributed checkpoint")
    source = read_config(ckpt_dir)
    _check_exits_match(model, source, ckpt_dir)
    if source.tensor_model_parallel_size != 1:
        raise ValueError(f"{ckpt_dir} was saved at tensor_model_parallel_size={source.tensor_model_parallel_size}; "
                         "EE-Tuning loads TP=1 checkpoints (convert it with scripts/reshard.py --tp 1)")
    local_depth, full_depth = model.ee_config.num_layers, source.num_layers
    sharded = {"model": model.sharded_state_dict()}
    factories, _ = extract_matching_values(sharded, lambda x: isinstance(x, ShardedTensorFactory),
                                           return_lists_as_dicts=True)
    apply_factories(sharded)
    names: list[str] = []
    flattened: list[tuple[tuple, tuple]] = []  # (path in the state dict, the stage's tensor shape)

    def widen(item: Any, path: tuple) -> Any:
        if not isinstance(item, (ShardedTensor, ShardedObject)) or not item.key.startswith(_LAYERS_PREFIX):
            if isinstance(item, ShardedTensor):
                names.append(item.key)
            return item
        if isinstance(item, ShardedObject):
            if item.global_shape[:1] == (local_depth,):
                item = dataclasses.replace(item, global_shape=(full_depth, *item.global_shape[1:]))
            return item
        if item.prepend_axis_num != 1 or item.global_shape[0] != local_depth:
            raise ValueError(f"{item.key}: unexpected layer sharding {item.global_shape} (stage depth {local_depth})")
        # The stacked-layer axis is made a real axis of the request (a [1, ...] view of the stage's tensor) with
        # no regular fragment grid: megatron then reads exactly these slices of the full-depth tensor (its
        # regular-grid path would insist that the requests of all ranks cover the whole stacked tensor).
        view = item.data.view(1, *item.local_shape)
        flattened.append((path, item.local_shape))
        names.append(f"{_LAYERS_PREFIX}{item.global_offset[0]}.{item.key[len(_LAYERS_PREFIX):]}")
        return dataclasses.replace(item, data=view, local_shape=tuple(view.shape), prepend_axis_num=0,
                                   global_shape=(full_depth, *item.global_shape[1:]), axis_fragmentations=None)

    _map_with_path(widen, sharded)
    loaded, _, model_only = dist_checkpointing.load(
        sharded, str(ckpt_dir), strict=StrictHandling.RETURN_ALL, validate_access_integrity=False)
    if model_only:
        keys = sorted({getattr(k, "key", str(k)) for k in model_only})
        raise KeyError(f"checkpoint {ckpt_dir} lacks {len(keys)} tensor(s) of the tuning model: {keys[:10]}")
    for path, shape in flattened:
        *parents, last = path
        holder = loaded
        for step in parents:
            holder = holder[step]
        holder[last] = holder[last].view(shape)
    loaded = apply_factory_merges(loaded, factories)
    model.load_state_dict(loaded["model"], strict=True)
    return sorted(set(names))


def _map_with_path(fn: Any, tree: Any, path: tuple = ()) -> None:
    """``tree[...] = fn(leaf, path)`` for every leaf of nested dicts / lists, in place."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in list(items):
        if isinstance(value, (dict, list)):
            _map_with_path(fn, value, path + (key,))
        else:
            tree[key] = fn(value, path + (key,))


def source_name(name: str, layer_offset: int) -> str:
    """The TP=PP=1 state-dict name of a stage's state-dict entry (local layer numbers -> global ones)."""
    match = _LAYER_KEY.match(name)
    if match:
        return f"{_LAYERS_PREFIX}{int(match.group(1)) + layer_offset}.{match.group(2)}"
    if name == "exit_word_embeddings":  # a middle stage's copy of the word embedding for tied exits
        return "embedding.word_embeddings.weight"
    return name


def load_stage_from_safetensors(model: torch.nn.Module, path: Union[str, os.PathLike], prefix: str = "") -> list[str]:
    """Load this stage from a TP=PP=1 safetensors state dict (e.g. a .nemo's weights), reading only its tensors.

    ``prefix``: of the source names (``"model."`` in a .nemo). Returns the source names read (global layer numbers).
    """
    from safetensors import safe_open

    state, read, problems = {}, [], []
    with safe_open(str(path), framework="pt", device="cpu") as f:
        available = set(f.keys())
        for name, value in model.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            src = prefix + source_name(name, model.layer_offset)
            if src not in available:
                problems.append(f"{src} is missing")
                continue
            tensor = f.get_tensor(src)
            if tuple(tensor.shape) != tuple(value.shape):
                problems.append(f"{src} has shape {tuple(tensor.shape)}, the stage expects {tuple(value.shape)}")
                continue
            state[name] = tensor
            read.append(src)
    if problems:
        raise KeyError(f"{path} does not fit the tuning stage: " + "; ".join(problems[:10]))
    result = model.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if left or result.unexpected_keys:
        raise KeyError(f"{path}: missing {left}, unexpected {result.unexpected_keys}")
    return sorted(read)


# ------------------------------------------------------------------------------------------------ tuning
class PipelineEETuner:
    """Frozen-backbone exit training of one pipeline stage (collective: every stage calls :meth:`step`).

    Same loss as :class:`nemo_ee.tuning.ee_tune.EETuner`: sum_i w_i(iteration) * CE_i summed over the
    global batch's tokens / its token count, whatever the micro-batch split and the pipeline size.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 clip_grad: float = 1.0) -> None:
        from megatron.core import parallel_state

        self.model = model
        self.ee_config: EarlyExitConfig = model.ee_config
        self.schedule = ExitWeightSchedule.from_config(self.ee_config)
        self.params = freeze_backbone(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay) if self.params else None
        self.clip_grad = clip_grad
        self.iteration = 0
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()

    @property
    def has_trainable(self) -> bool:
        return bool(self.params)

    def step(self, microbatches: list[dict]) -> dict[int, float]:
        """One tuning step over the micro-batches (tokens, labels, loss_mask, position_ids; same on every stage).

        Returns {exit index: mean CE before the update} for every exit of the model, on every stage.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_ee.parallel.schedules import schedule_kwargs

        weights = self.schedule.weights(self.iteration)
        num_tokens = sum(mb["loss_mask"].float().sum() for mb in microbatches).clamp(min=1.0)
        sums = torch.zeros(self.ee_config.num_exits, dtype=torch.float64)
        self.model.train()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

        def forward_step(data_iterator: Any, model: torch.nn.Module):
            mb = next(data_iterator)
            hidden, losses = self.model.forward_frozen_stage(mb["tokens"], mb["position_ids"], mb["labels"],
                                                             run_to_end=not self.is_last_stage)
            if losses:
                (weighted_exit_sum(losses, weights, mb["loss_mask"]) / num_tokens).backward()
                for index, ce in losses.items():
                    sums[index] += float(masked_sum(ce.detach(), mb["loss_mask"]))
            if not self.is_last_stage:
                return hidden, None
            return torch.zeros(()), lambda out: (out, {})

        seq_length = microbatches[0]["tokens"].shape[1]  # the tuning windows' (may be below the model's seq_length)
        get_forward_backward_func()(
            **schedule_kwargs(forward_step, [self.model], microbatches, seq_length), forward_only=True)
        self._clip_and_step()
        if self.pp_size > 1:
            dist.all_reduce(sums, group=self.pp_group)  # each exit lives on one stage: a sum gathers them
        self.iteration += 1
        return {i: float(v) for i, v in enumerate((sums / float(num_tokens)).tolist())}

    def _clip_and_step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.clip_grad > 0:
            local = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros(())
            total_sq = local.double() ** 2
            if self.pp_size > 1:
                dist.all_reduce(total_sq, group=self.pp_group)
            if grads:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_grad, total_sq.sqrt().float())
        if self.optimizer is not None:
            self.optimizer.step()


def gather_exit_state(model: torch.nn.Module, dst: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Every exit tensor of the model ({"exits.I...": tensor}), gathered from all stages (to ``dst`` only if given)."""
    local = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k.startswith("exits.") and torch.is_tensor(v)}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    if dst is None:
        dist.all_gather_object(parts, local)
    else:
        dist.gather_object(local, parts if dist.get_rank() == dst else None, dst=dst)
        if dist.get_rank() != dst:
            return {}
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged
