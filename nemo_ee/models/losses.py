"""The multi-exit loss: sum_i w_i(iteration) * CE_i + CE_final, with the loss mask applied.

Per-token losses come from the model (temperature and dynamic token weights are applied there,
where the logits live); this module owns the weight schedules and the masked reduction, and the
per-token distillation loss of EE-Tuning with ``loss=kl`` (:func:`distillation_targets`, :func:`distillation_kl`).
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


def distillation_targets(final_logits: torch.Tensor, temperature: float = 1.0,
                         inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's soft targets at temperature T: (p = softmax(final / T) [..., v] fp32, sum_v p log p [...]).

    No gradient. ``inplace``: ``final_logits`` (fp32) is overwritten with log p on the way (the caller hands it
    over), so the targets cost one [..., v] tensor beyond the logits; otherwise a copy is made.
    """
    with torch.no_grad():
        log_p = final_logits.float()
        if not inplace and log_p is final_logits:
            log_p = log_p.clone()
        if temperature != 1.0:
            log_p.div_(temperature)
        log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))
        probs = log_p.exp()
        neg_entropy = log_p.mul_(probs).sum(dim=-1)
    return probs, neg_entropy


def distillation_kl(exit_logits: torch.Tensor, target_probs: torch.Tensor, target_neg_entropy: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-token T^2 * KL(p || q) [...], q = softmax(exit_logits / T); p, sum p log p: :func:`distillation_targets`.

    KL(p || q) = sum_v p log p - sum_v p log q (absolute fp32 error ~1e-7); the gradient reaches ``exit_logits`` only. One log-softmax of the
    exit logits is kept for the backward; the p . log q contraction does not materialise a [..., v] product.
    """
    logits = exit_logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_q = torch.log_softmax(logits, dim=-1)
    del logits
    cross = torch.einsum("...v,...v->...", target_probs, log_q)
    return (target_neg_entropy - cross) * (temperature * temperature)
