"""EE-Tuning step 2: train the exits of a trained model with its backbone frozen (TP=PP=1; PP>1: tuning/pipeline.py).

- every parameter not under ``exits.`` gets ``requires_grad=False`` (:func:`freeze_backbone`);
- the backbone runs under ``torch.no_grad`` up to the deepest exit only and the exits read detached
  hidden states (``EarlyExitGPTModel.forward_exits_only(..., frozen_backbone=True)``): no final loss,
  no output layer, no layer after the last exit, no backbone activations kept for backward;
- optionally the layers after the last exit are not even built (:func:`build_truncated_model`);
- loss = sum_i w_i(iteration) * mean-over-tokens CE_i, with the config's weight schedules, temperature
  and dynamic token weighting;
- the optimizer sees the exit parameters only (plain torch AdamW, or megatron's through its DDP).

A model (or pipeline stage) with no exit parameters is a no-op: :meth:`EETuner.step` returns ``{}``
and changes nothing, so a stage without exits does not crash (EE-LLM issue #12, "optimizer got an
empty parameter list").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch

from nemo_ee.atomic import save_nemo
from nemo_ee.config import EarlyExitConfig
from nemo_ee.models.losses import ExitWeightSchedule, masked_sum, weighted_exit_sum

EXIT_PREFIX = "exits."


def freeze_backbone(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``requires_grad=False`` on every parameter outside ``exits.``; returns the exit parameters.

    Tied exits use the (frozen) word embedding, so they contribute only their norm/MLP/block.
    """
    trainable = []
    for name, param in model.named_parameters():
        is_exit = name.startswith(EXIT_PREFIX)
        param.requires_grad_(is_exit)
        if is_exit:
            trainable.append(param)
    return trainable


def truncated_config(ee_config: EarlyExitConfig) -> EarlyExitConfig:
    """The config with the backbone cut after the last exit's layer (nothing after it is needed)."""
    if ee_config.pipeline_model_parallel_size != 1:
        raise ValueError("a truncated backbone is for pipeline_model_parallel_size=1")
    if not ee_config.exit_layer_nums:
        raise ValueError("the config has no exits: nothing to tune")
    return dataclasses.replace(ee_config, num_layers=max(ee_config.exit_layer_nums))


def build_truncated_model(ee_config: EarlyExitConfig, state_dict: Optional[Mapping[str, Any]] = None):
    """The first stage of a model whose backbone ends at the last exit: no final norm, no output layer.

    ``state_dict``: the full model's (e.g. ``model.state_dict()`` of a .nemo from add_exits); the kept
    layers, embedding and exits are loaded from it, everything else is ignored. megatron's parallel_state
    must be initialised (TP=PP=1).
    """
    from nemo_ee.models import build_model

    model = build_model(truncated_config(ee_config), pre_process=True, post_process=False)
    if state_dict is not None:
        own = model.state_dict()
        missing = [k for k in own if k not in state_dict and not k.endswith("_extra_state")]
        if missing:
            raise KeyError(f"the state dict lacks {len(missing)} keys of the truncated model, e.g. {missing[:3]}")
        model.load_state_dict({k: state_dict[k] for k in own if k in state_dict}, strict=False)
    return model


def exit_tuning_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor],
    weights: list[float],
    position_ids: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], dict[int, float]]:
    """(sum_i w_i * mean CE_i, {exit index: mean CE_i}) with the backbone frozen; (None, {}) without exits."""
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    if loss_mask is None:
        loss_mask = torch.ones_like(labels, dtype=torch.float32)
    losses = model.forward_exits_only(tokens, position_ids, labels, frozen_backbone=True)
    if not losses:
        return None, {}
    num_tokens = loss_mask.float().sum().clamp(min=1.0)
    total = weighted_exit_sum(losses, weights, loss_mask) / num_tokens
    means = {i: float(masked_sum(ce.detach(), loss_mask) / num_tokens) for i, ce in losses.items()}
    return total, means


class EETuner:
    """Frozen-backbone exit training on one model (TP=PP=1).

    ``optimizer``: ``"torch"`` (AdamW over the exit parameters) or ``"megatron"`` (megatron's DDP and
    optimizer, with the settings of :class:`nemo_ee.parallel.optimizer.OptimSettings`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "torch",
        settings: Any = None,
        max_steps: int = 1000,
        clip_grad: float = 1.0,
    ) -> None:
        if optimizer not in ("torch", "megatron"):
            raise ValueError(f"optimizer={optimizer!r} is not one of ['torch', 'megatron']")
        self.model = model
        self.ee_config: EarlyExitConfig = model.ee_config
        self.schedule = ExitWeightSchedule.from_config(self.ee_config)
        self.params = freeze_backbone(model)
        self.iteration = 0
        self.clip_grad = clip_grad
        self.kind = optimizer
        self.ddp = None
        self.optimizer = None
        if not self.params:
            return  # nothing to train on this model / stage: every step is a no-op
        if optimizer == "torch":
            self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        else:
            from nemo_ee.parallel.optimizer import OptimSettings, build_optimizer, wrap_ddp

            settings = settings or OptimSettings(lr=lr, min_lr=lr, weight_decay=weight_decay,
                                                 decay_style="constant", clip_grad=clip_grad)
            self.ddp = wrap_ddp(model)
            self.optimizer = build_optimizer(self.ddp, settings, max_steps)

    @property
    def has_trainable(self) -> bool:
        return bool(self.params)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
             position_ids: Optional[torch.Tensor] = None) -> dict[int, float]:
        """One tuning step; returns {exit index: mean CE before the update} ({} and no-op without exits)."""
        if not self.params:
            self.iteration += 1
            return {}
        self.model.train()
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        loss, means = exit_tuning_loss(self.model, tokens, labels, loss_mask,
                                       self.schedule.weights(self.iteration), position_ids)
        loss.backward()
        if self.ddp is not None:
            self.ddp.finish_grad_sync()
        elif self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()
        self.iteration += 1
        return means


# ---------------------------------------------------------------------- .nemo driver (scripts/ee_tune.py)
def batch_order(num_samples: int, seed: int) -> torch.Tensor:
    """The sample order of a tuning run (the same on every rank and at every pipeline size)."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))


def step_batch(dataset: Any, order: torch.Tensor, step: int, size: int) -> dict:
    """The ``size`` samples of tuning step ``step``, stacked (tokens, labels, loss_mask, position_ids)."""
    items = [dataset[int(order[(step * size + j) % len(order)])] for j in range(size)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def format_losses(ee_config: EarlyExitConfig, losses: Mapping[int, float]) -> str:
    """``exit_l2=3.1234 exit_l4=2.9876``: per-exit losses named by their layers."""
    return " ".join(f"exit_l{ee_config.exit_layer_nums[i]}={v:.4f}" for i, v in sorted(losses.items()))


def tune_nemo(cfg: Any) -> dict:
    """Tune the exits of ``cfg.restore_from`` (a .nemo from add_exits) and write ``cfg.output``.

    ``cfg`` is conf/ee_tuning.yaml; the backbone is restored and saved bit-exactly. TP=PP=1 runs in this
    process; ``pipeline_model_parallel_size`` > 1 (under torchrun, one process per stage) runs the
    pipeline tuner (:func:`nemo_ee.tuning.nemo_pipeline.tune_nemo_pipeline`).
    Returns {"first": {exit: CE}, "last": {exit: CE}, "steps": n, "output": path}.
    """
    from pathlib import Path

    from omegaconf import OmegaConf

    from nemo_ee.data import build_datasets
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel, _cache_dir, _corpus_spec

    pp = cfg.get("pipeline_model_parallel_size", 1)
    if pp != 1:
        from nemo_ee.tuning.nemo_pipeline import tune_nemo_pipeline

        return tune_nemo_pipeline(cfg)
    if int(cfg.get("num_microbatches", 1)) != 1:
        raise ValueError(f"num_microbatches={cfg.num_microbatches} needs pipeline_model_parallel_size > 1 "
                         "(at 1 a step is one batch of micro_batch_size)")
    src, dst = Path(str(cfg.restore_from)), Path(str(cfg.output))
    if dst.suffix != ".nemo":
        raise ValueError(f"output={dst} must end in .nemo")
    if dst.exists() and not bool(cfg.get("overwrite", False)):
        raise FileExistsError(f"output={dst} exists; set overwrite=true to replace it")
    model = EarlyExitGPTNeMoModel.restore_from(str(src), map_location="cpu")
    ee = model.ee_config
    if ee.tensor_model_parallel_size * ee.pipeline_model_parallel_size > 1:
        raise ValueError("EE-Tuning from a .nemo runs single-process at TP=PP=1")
    if not ee.num_exits:
        raise ValueError(f"{src} has no exits: add them first with scripts/add_exits.py")
    data_cfg = OmegaConf.merge(model.cfg.data, {k: v for k, v in (cfg.get("data") or {}).items() if v is not None})
    train_ds, _ = build_datasets(_corpus_spec(data_cfg), model.tokenizer, ee.seq_length, _cache_dir(model.cfg))
    optim = cfg.optim
    tuner = EETuner(model.model, lr=float(optim.lr), weight_decay=float(optim.weight_decay),
                    optimizer=str(cfg.get("optimizer", "torch")), clip_grad=float(optim.clip_grad),
                    max_steps=int(cfg.max_steps))
    mbs, steps, every = int(cfg.micro_batch_size), int(cfg.max_steps), max(1, int(cfg.get("log_every_n_steps", 10)))
    order = batch_order(len(train_ds), int(cfg.seed))
    first = last = {}
    for step in range(steps):
        batch = step_batch(train_ds, order, step, mbs)
        last = tuner.step(batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"])
        first = first or last
        if step % every == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: {format_losses(ee, last)}", flush=True)
    for p in model.model.parameters():
        p.requires_grad_(True)
    save_nemo(model, dst)
    print(f"wrote {dst}")
    return {"first": first, "last": last, "steps": steps, "output": str(dst)}
