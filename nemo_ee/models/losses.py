"""The multi-exit loss: sum_i w_i(iteration) * CE_i + CE_final, with the loss mask applied.

Per-token losses come from the model (temperature and dynamic token weights are applied there,
where the logits live); this module owns the weight schedules and the masked reduction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from nemo_ee.config import EarlyExitConfig


def scheduled_weight(iteration: int, target: float, init: Optional[float], warmup_iters: int, style: str) -> float:
    """Weight at ``iteration``: from ``init`` to ``target`` over ``warmup_iters`` (linear or cosine).

    With ``target < init`` the same schedule is a cool-down. ``init=None`` or no warm-up: constant target.
    """
    if style not in ("linear", "cosine"):
        raise ValueError(f"warm-up style {style!r} is not one of ['linear', 'cosine']")
    if init is None or warmup_iters <= 0 or iteration >= warmup_iters:
        return float(target)
    progress = max(iteration, 0) / warmup_iters
    if style == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return float(init + (target - init) * progress)


@dataclass
class ExitWeightSchedule:
    """The per-exit loss weights of a config, as a function of the training iteration."""

    targets: list
    inits: list
    warmups: list
    styles: list

    @classmethod
    def from_config(cls, cfg: EarlyExitConfig) -> "ExitWeightSchedule":
        return cls(
            targets=cfg.per_exit("exit_loss_weights"),
            inits=cfg.per_exit("exit_loss_init_weights"),
            warmups=cfg.per_exit("exit_loss_warmup_iters"),
            styles=cfg.per_exit("exit_loss_warmup_style"),
        )

    def weights(self, iteration: int) -> list[float]:
        return [
            scheduled_weight(iteration, t, i, w, s)
            for t, i, w, s in zip(self.targets, self.inits, self.warmups, self.styles)
        ]


def masked_sum(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of a [b, s] per-token loss over the tokens the mask keeps (fp32)."""
    return torch.sum(per_token.float().reshape(-1) * loss_mask.float().reshape(-1))


def weighted_exit_sum(
    exit_losses: Mapping[int, torch.Tensor], weights: list[float], loss_mask: torch.Tensor
) -> torch.Tensor:
    """sum_i w_i * sum_tokens(CE_i * mask) over the exits present (keys are global exit indices)."""
    total = None
    for idx, per_token in exit_losses.items():
        term = weights[idx] * masked_sum(per_token, loss_mask)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), dtype=torch.float32, device=loss_mask.device)
    return total


def token_weighted_ce(
    ce: torch.Tensor, max_prob: Optional[torch.Tensor]
) -> torch.Tensor:
    """Dynamic token-wise weighting: CE times the exit's max softmax probability (no gradient)."""
    return ce if max_prob is None else ce * max_prob.detach()
