"""Exit policies: when is an exit confident enough for a token to leave the network there?

All three read the exit's softmax at temperature 1 (sampling temperature does not move the decision):
- ``max_prob``: max probability >= threshold (EE-LLM's rule); a threshold above 1 never fires;
- ``entropy``: entropy (nats) <= threshold; 0 fires only on a one-hot distribution;
- ``top2_margin``: top-1 minus top-2 probability >= threshold; above 1 never fires.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

POLICIES = ("max_prob", "entropy", "top2_margin")


def check_threshold(policy: str, threshold: float) -> float:
    """The threshold as a float, or a ValueError naming the policy's range."""
    if policy not in POLICIES:
        raise ValueError(f"exit_policy {policy!r} is not one of {list(POLICIES)}")
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"early_exit_threshold {threshold!r} is not a number") from None
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(
            f"early_exit_threshold {threshold!r} is outside the range of {policy!r}: a finite number >= 0"
            + (" (above 1 never exits)" if policy != "entropy" else " (entropy in nats)")
        )
    return value


def confidence(policy: str, logits: torch.Tensor) -> torch.Tensor:
    """The policy's statistic per row of ``logits`` [..., vocab] (float32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if policy == "max_prob":
        return probs.max(dim=-1).values
    if policy == "entropy":
        return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)
    if policy == "top2_margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    raise ValueError(f"exit_policy {policy!r} is not one of {list(POLICIES)}")


@dataclasses.dataclass(frozen=True)
class ExitRule:
    """One request's exit rule: policy, threshold, and the exits it may use (global exit indices).

    ``forced``: always leave at this exit (the draft model of self-speculative decoding).
    ``threshold=None``: never exit early (full-model decoding).
    ``per_exit``: {exit index: threshold} overriding ``threshold`` at those exits (calibrated thresholds).
    ``vocab``: the token ids the exits score (sorted, distinct; None: the whole vocabulary). An exit's
    statistic and token then come from those logits only: the exit reads a slice of its output matrix.
    """

    policy: str = "max_prob"
    threshold: Optional[float] = None
    active: Optional[frozenset] = None
    forced: Optional[int] = None
    per_exit: Optional[tuple] = None
    vocab: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.threshold is not None:
            object.__setattr__(self, "threshold", check_threshold(self.policy, self.threshold))
        elif self.policy not in POLICIES:
            raise ValueError(f"exit_policy {self.policy!r} is not one of {list(POLICIES)}")
        if self.active is not None:
            object.__setattr__(self, "active", frozenset(int(i) for i in self.active))
        if self.per_exit is not None:
            items = dict(self.per_exit).items()
            object.__setattr__(self, "per_exit", tuple(sorted(
                (int(i), check_threshold(self.policy, t)) for i, t in items)))

    def threshold_at(self, exit_index: int) -> Optional[float]:
        """The threshold in force at exit ``exit_index`` (None: this rule never exits)."""
        if self.per_exit is not None:
            for index, value in self.per_exit:
                if index == exit_index:
                    return value
        return self.threshold

    @classmethod
    def full(cls) -> "ExitRule":
        return cls(threshold=None)

    def uses(self, exit_index: int) -> bool:
        """Whether this rule evaluates exit ``exit_index`` at all."""
        if self.forced is not None:
            return exit_index == self.forced
        if self.threshold_at(exit_index) is None:
            return False
        return self.active is None or exit_index in self.active

    def fires(self, logits: torch.Tensor, exit_index: Optional[int] = None) -> torch.Tensor:
        """Bool per row of ``logits`` [..., vocab]: does the token leave at exit ``exit_index``?"""
        if self.forced is not None:
            return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        threshold = self.threshold if exit_index is None else self.threshold_at(exit_index)
        if threshold is None:
            return torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        stat = confidence(self.policy, logits)
        return stat <= threshold if self.policy == "entropy" else stat >= threshold


def check_active_exits(active: Optional[Sequence[int]], exit_layer_nums: Sequence[int]) -> Optional[frozenset]:
    """Active exits given as layer numbers -> global exit indices; an unknown layer is an error."""
    if active is None:
        return None
    index = {layer: i for i, layer in enumerate(exit_layer_nums)}
    unknown = [a for a in active if int(a) not in index]
    if unknown:
        raise ValueError(f"active exit layers {unknown} are not exits of this model (exits at {list(exit_layer_nums)})")
    return frozenset(index[int(a)] for a in active)
