"""EE-Tuning step 2: train the exits of a trained model with its backbone frozen (TP=PP=1; PP>1: tuning/pipeline.py).

- every parameter not under ``exits.`` gets ``requires_grad=False`` (:func:`freeze_backbone`);
- the backbone runs under ``torch.no_grad`` up to the deepest exit only and the exits read detached
  hidden states (``EarlyExitGPTModel.forward_exits_only(..., frozen_backbone=True)``): no final loss,
  no output layer, no layer after the last exit, no backbone activations kept for backward;
- optionally the layers after the last exit are not even built (:func:`build_truncated_model`);
- loss = sum_i w_i(iteration) * mean-over-tokens L_i, with the config's weight schedules, temperature
  and dynamic token weighting; L_i is the exit's next-token cross-entropy (``loss="ce"``) or, by
  distillation (``loss="kl"``), T^2 * KL(p_final || p_exit) to the frozen model's own final-layer distribution
  at temperature T. With ``kl`` the backbone runs to its end (final norm and output layer, under no_grad:
  the teacher) and each exit is back-propagated as soon as its loss exists (one exit's [b, s, v] at a time);
  kl needs the whole model on one stage (not a truncated model, not pipeline parallel);
- the optimizer sees the exit parameters only (plain torch AdamW, or megatron's through its DDP).

A model (or pipeline stage) with no exit parameters is a no-op: :meth:`EETuner.step` returns ``{}``
and changes nothing, so a stage without exits does not crash (EE-LLM issue #12, "optimizer got an
empty parameter list").
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from nemo_ee.atomic import save_nemo
from nemo_ee.config import EarlyExitConfig
from nemo_ee.models.losses import (
    ExitWeightSchedule, distillation_kl, distillation_targets, masked_sum, token_weighted_ce, weighted_exit_sum,
)
from nemo_ee.tuning.data import data_sources, tuning_dataset

EXIT_PREFIX = "exits."
LOSSES = ("ce", "kl")  # next-token cross-entropy | KL(p_final || p_exit), distillation from the final layer


def check_objective(loss: Any, kl_temperature: Any = 1.0) -> tuple[str, float]:
    """The validated (loss, kl_temperature) of a tuning run."""
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {list(LOSSES)} (ce: next-token cross-entropy of each exit; "
                         "kl: KL(p_final || p_exit) to the model's own final-layer distribution)")
    t = kl_temperature
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(float(t)) or float(t) <= 0:
        raise ValueError(f"kl_temperature={kl_temperature!r} must be a finite number > 0")
    return loss, float(t)


def loss_label(loss: str, kl_temperature: float = 1.0) -> str:
    """What the per-exit numbers of a tuning log are: ``ce`` or ``kl to final, T=...``."""
    return "ce" if loss == "ce" else f"kl to final, T={kl_temperature:g}"


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


def exit_distillation_loss(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    loss_mask: Optional[torch.Tensor],
    weights: list[float],
    position_ids: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    backward: bool = False,
) -> tuple[Optional[torch.Tensor], dict[int, float]]:
    """(sum_i w_i * mean_tokens T^2 KL(p_final || p_exit_i), {exit index: mean T^2 KL_i}); (None, {}) without exits.

    p_final: softmax(final logits / T) of the frozen model (the whole backbone, final norm and output layer, under
    ``no_grad``); p_exit_i: softmax(exit logits / T). In training mode the exit's ``exit_logit_temperature``
    divides its logits first and ``exit_dynamic_token_weight`` weights each token by the exit's max probability,
    as with cross-entropy. ``backward``: each exit's weighted term is back-propagated as soon as it is computed and
    its graph freed (one exit's [b, s, v] tensors alive at a time); the returned total is then detached.
    """
    from nemo_ee.models.exit_head import vocab_parallel_max_prob

    if not len(model.exits):
        return None, {}
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    final, exits = model.forward_frozen_with_final(tokens, position_ids)
    if loss_mask is None:
        loss_mask = torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device)
    probs, neg_entropy = distillation_targets(final, temperature, inplace=True)
    del final  # overwritten by log p and dropped: the teacher now costs p only
    ee = model.ee_config
    exit_temps, dynamic = ee.per_exit("exit_logit_temperature"), ee.per_exit("exit_dynamic_token_weight")
    num_tokens = loss_mask.float().sum().clamp(min=1.0)
    total, means = None, {}
    for index, exit_logits in exits.items():
        logits = exit_logits()
        if model.training and float(exit_temps[index]) != 1.0:
            logits = logits / float(exit_temps[index])
        max_prob = vocab_parallel_max_prob(logits, None) if model.training and dynamic[index] else None
        per_token = token_weighted_ce(distillation_kl(logits, probs, neg_entropy, temperature), max_prob)
        del logits
        term = weighted_exit_sum({index: per_token}, weights, loss_mask) / num_tokens
        means[index] = float(masked_sum(per_token.detach(), loss_mask) / num_tokens)
        if backward:
            term.backward()
            term = term.detach()
        del per_token
        total = term if total is None else total + term
    return total, means


class EETuner:
    """Frozen-backbone exit training on one model (TP=PP=1).

    ``optimizer``: ``"torch"`` (AdamW over the exit parameters) or ``"megatron"`` (megatron's DDP and
    optimizer, with the settings of :class:`nemo_ee.parallel.optimizer.OptimSettings`).
    ``loss``: ``"ce"`` (:func:`exit_tuning_loss`; the backbone stops at the deepest exit, a truncated model
    works) or ``"kl"`` (:func:`exit_distillation_loss` at ``kl_temperature``; needs the full model).
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
        loss: str = "ce",
        kl_temperature: float = 1.0,
    ) -> None:
        if optimizer not in ("torch", "megatron"):
            raise ValueError(f"optimizer={optimizer!r} is not one of ['torch', 'megatron']")
        self.loss, self.kl_temperature = check_objective(loss, kl_temperature)
        if self.loss == "kl" and not (model.pre_process and model.post_process):
            raise ValueError("loss='kl' distils the final layer: it needs the full model (embedding to final norm and "
                             "output layer, e.g. not one from build_truncated_model, which stops at the last exit)")
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
        """One tuning step; returns {exit index: mean loss (CE or KL) before the update} ({} and no-op without exits).

        ``labels`` are not used with ``loss="kl"`` (the targets are the final layer's distribution)."""
        if not self.params:
            self.iteration += 1
            return {}
        self.model.train()
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        weights = self.schedule.weights(self.iteration)
        if self.loss == "kl":  # each exit back-propagated as soon as its loss exists
            _, means = exit_distillation_loss(self.model, tokens, loss_mask, weights, position_ids,
                                              self.kl_temperature, backward=True)
        else:
            loss, means = exit_tuning_loss(self.model, tokens, labels, loss_mask, weights, position_ids)
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


def step_line(step: int, steps: int, ee_config: EarlyExitConfig, losses: Mapping[int, float], label: str) -> str:
    """A tuning log line, ``step 3/200: exit_l2=3.1234 exit_l4=2.9876 (ce)`` (1-based step; ``label`` from
    :func:`loss_label`). nemo_ee/pipeline/curves.py parses it: ``step n/N: `` then the ``exit_l<k>=<value>`` items
    (other items, such as the trailing loss name, are skipped)."""
    return f"step {step + 1}/{steps}: {format_losses(ee_config, losses)} ({label})"


def check_tuning_settings(cfg: Any) -> tuple[str, float]:
    """The checks of a conf/ee_tuning.yaml that need no model (run before any work): returns (loss, kl_temperature)."""
    loss, temperature = check_objective(cfg.get("loss", "ce"), cfg.get("kl_temperature", 1.0))
    pp = cfg.get("pipeline_model_parallel_size", 1)
    if loss == "kl" and pp != 1:
        raise ValueError(f"loss=kl needs pipeline_model_parallel_size=1 (got {pp!r}): the teacher (the final norm and "
                         "output layer) is on the last pipeline stage while the exits sit on earlier ones, and the "
                         "pipeline tuner builds the model only up to its last exit; use loss=ce at PP > 1")
    data_sources(cfg)
    lstsq_settings(cfg)
    return loss, temperature


def lstsq_settings(cfg: Any) -> tuple[int, float]:
    """(windows, ridge) of the least-squares exit init (``lstsq_init_windows`` 0: off), checked."""
    windows, ridge = cfg.get("lstsq_init_windows", 0), cfg.get("lstsq_ridge", 1e-2)
    if isinstance(windows, bool) or not isinstance(windows, numbers.Integral) or windows < 0:
        raise ValueError(f"lstsq_init_windows={windows!r} must be an integer >= 0 (0: copy init only)")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"lstsq_ridge={ridge!r} must be a finite number >= 0")
    if windows and cfg.get("pipeline_model_parallel_size", 1) != 1:
        raise ValueError(f"lstsq_init_windows={windows} needs pipeline_model_parallel_size=1 (the fit reads the final "
                         "output layer's input)")
    return int(windows), float(ridge)


def lstsq_init(model: torch.nn.Module, dataset: Any, order: torch.Tensor, cfg: Any) -> dict:
    """Fit the exits' output layers by least squares on the first ``lstsq_init_windows`` windows of the run's
    sample order (:mod:`nemo_ee.tuning.lstsq_init`); {} when off. Prints the fit per exit."""
    from nemo_ee.tuning.lstsq_init import fit_exit_output_layers

    windows, ridge = lstsq_settings(cfg)
    if not windows:
        return {}
    batches = (step_batch(dataset, order, i, 1) for i in range(min(windows, len(order))))
    stats = fit_exit_output_layers(model, batches, ridge)
    layers = model.ee_config.exit_layer_nums
    for index, st in stats.items():
        log_line(f"least-squares init, exit at layer {layers[index]}: relative residual {st['residual']:.4f} "
                 f"(copy init {st['identity_residual']:.4f}) over {st['tokens']} tokens")
    return {layers[i]: st for i, st in stats.items()}


def tuning_seq_length(value: Any, model_seq_length: int) -> int:
    """The length of the tuning windows: ``None`` = the model's ``seq_length``, else an integer in [2, that]."""
    if value is None:
        return int(model_seq_length)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 2 <= value <= model_seq_length:
        raise ValueError(f"seq_length={value!r} must be null (the model's seq_length, {model_seq_length}) or an "
                         f"integer in [2, {model_seq_length}]")
    return int(value)


def nemo_seq_length(path: Any) -> int:
    """The ``seq_length`` of a .nemo's model, read from its config without loading the weights."""
    from omegaconf import OmegaConf

    from nemo_ee.tuning.add_exits import read_nemo_config

    arch = OmegaConf.to_container(read_nemo_config(path).get("arch") or {}, resolve=True)
    return int(arch.get("seq_length", EarlyExitConfig.seq_length))


def progress(steps: int, label: str, enabled: bool = True):
    """The tqdm bar over a run's steps (on stderr; log lines go through ``tqdm.write`` to stdout)."""
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"EE-Tuning ({label})", unit="step", disable=not enabled, dynamic_ncols=True)


def log_line(line: str) -> None:
    """Print a log line to stdout above the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line)
    sys.stdout.flush()


def tune_nemo(cfg: Any) -> dict:
    """Tune the exits of ``cfg.restore_from`` (a .nemo from add_exits) and write ``cfg.output``.

    ``cfg`` is conf/ee_tuning.yaml; the backbone is restored and saved bit-exactly. TP=PP=1 runs in this
    process; ``pipeline_model_parallel_size`` > 1 (under torchrun, one process per stage) runs the
    pipeline tuner (:func:`nemo_ee.tuning.nemo_pipeline.tune_nemo_pipeline`). Training windows are
    ``cfg.seq_length`` tokens (null: the model's); ``cfg.loss`` is ``ce`` or ``kl`` (PP=1 only).
    Returns {"first": {exit: loss}, "last": {exit: loss}, "steps": n, "output": path, "loss": "ce" | "kl",
    "seq_length": n}.
    """
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    loss, temperature = check_tuning_settings(cfg)
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
    if not src.is_file():
        raise FileNotFoundError(f"no .nemo file at restore_from={src}")
    seq_length = tuning_seq_length(cfg.get("seq_length"), nemo_seq_length(src))
    model = EarlyExitGPTNeMoModel.restore_from(str(src), map_location="cpu")
    ee = model.ee_config
    if ee.tensor_model_parallel_size * ee.pipeline_model_parallel_size > 1:
        raise ValueError("EE-Tuning from a .nemo runs single-process at TP=PP=1")
    if not ee.num_exits:
        raise ValueError(f"{src} has no exits: add them first with scripts/add_exits.py")
    train_ds = tuning_dataset(cfg, model.cfg, model.tokenizer, seq_length, ee.vocab_size)
    order = batch_order(len(train_ds), int(cfg.seed))
    fit = lstsq_init(model.model, train_ds, order, cfg)
    optim = cfg.optim
    tuner = EETuner(model.model, lr=float(optim.lr), weight_decay=float(optim.weight_decay),
                    optimizer=str(cfg.get("optimizer", "torch")), clip_grad=float(optim.clip_grad),
                    max_steps=int(cfg.max_steps), loss=loss, kl_temperature=temperature)
    mbs, steps, every = int(cfg.micro_batch_size), int(cfg.max_steps), max(1, int(cfg.get("log_every_n_steps", 10)))
    label = loss_label(loss, temperature)
    first = last = {}
    with progress(steps, label) as bar:
        for step in range(steps):
            batch = step_batch(train_ds, order, step, mbs)
            last = tuner.step(batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"])
            first = first or last
            bar.set_postfix_str(format_losses(ee, last), refresh=False)
            bar.update(1)
            if step % every == 0 or step == steps - 1:
                log_line(step_line(step, steps, ee, last, label))
    for p in model.model.parameters():
        p.requires_grad_(True)
    save_nemo(model, dst)
    print(f"wrote {dst}")
    return {"first": first, "last": last, "steps": steps, "output": str(dst), "loss": loss, "seq_length": seq_length,
            "lstsq_init": fit}
