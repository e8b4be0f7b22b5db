"""Choosing self-speculative settings (draft exit, draft length, adaptive threshold) on the model itself.

The full model's own greedy answers are teacher-forced once: at each answer position every exit's greedy
token (does it equal the full model's?) and its max probability. A round of self-speculative decoding is
then replayed on those sequences without running the model: draft while the count is below ``k`` and (with
a threshold) the draft's confidence stays at or above it; the drafts up to the first disagreement are
accepted, plus the full model's token. With measured step costs (a draft step at the exit, a full step)
this predicts each setting's speedup over full decoding; the best fixed ``k`` and the best adaptive setting
are then measured for real by the benchmark.

Drafts after the first disagreement are conditioned on a wrong token in a real run, not on the true prefix;
their confidences only decide how many wasted drafts a round makes, so the replay uses the teacher-forced
ones there too (an approximation the measurement then checks).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from nemo_ee.inference.bench import step_costs

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclasses.dataclass
class DraftStats:
    """Per exit layer, per answer: does the exit's greedy token equal the final one, and its max probability."""

    agree: dict[int, list[torch.Tensor]]
    conf: dict[int, list[torch.Tensor]]

    def acceptance(self, layer: int) -> float:
        """Share of answer positions where exit ``layer`` agrees with the final layer."""
        flat = torch.cat(self.agree[layer])
        return float(flat.float().mean()) if flat.numel() else 0.0


@torch.no_grad()
def draft_stats(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                answers: Sequence[Sequence[int]], vocab: Optional[Sequence[int]] = None) -> DraftStats:
    """Teacher-force each prompt + answer through the model once (answer positions only); ``vocab``: the exits
    score only these ids (an exit vocabulary)."""
    agree: dict[int, list[torch.Tensor]] = {}
    conf: dict[int, list[torch.Tensor]] = {}
    layers = model.ee_config.exit_layer_nums
    ids = torch.tensor(list(vocab)) if vocab is not None else None
    for prompt, answer in zip(prompts, answers):
        seq = torch.tensor([list(prompt) + list(answer)[:-1]])
        result = model(seq, torch.arange(seq.shape[1]).unsqueeze(0), None)
        start = len(prompt) - 1
        final = result.output[0, start:].argmax(-1)
        for index, logits in result.exits.items():
            tail = logits[0, start:].float()
            tail = tail[:, ids] if ids is not None else tail
            pick = tail.argmax(-1)
            agree.setdefault(layers[index], []).append((ids[pick] if ids is not None else pick) == final)
            conf.setdefault(layers[index], []).append(torch.softmax(tail, -1).max(-1).values)
    return DraftStats(agree, conf)


def replay(stats: DraftStats, layer: int, k: int, threshold: Optional[float], draft_cost: float) -> float:
    """Predicted speedup over full decoding of drafting at ``layer`` (up to ``k`` drafts; with ``threshold``,
    stopping after a draft whose max probability is below it); ``draft_cost``: a draft step over a full step."""
    tokens, cost = 0, 0.0
    for agree, conf in zip(stats.agree[layer], stats.conf[layer]):
        agree, conf = agree.tolist(), conf.tolist()
        i, n = 0, len(agree)
        while i < n:
            drafted = 0
            while drafted < k and i + drafted < n - 1:
                drafted += 1
                if threshold is not None and conf[i + drafted - 1] < threshold:
                    break
            accepted = 0
            while accepted < drafted and agree[i + accepted]:
                accepted += 1
            tokens += accepted + 1
            cost += drafted * draft_cost + 1.0
            i += accepted + 1
    return tokens / cost if cost else 1.0


def choose(stats: DraftStats, draft_costs: dict[int, float], ks: Sequence[int] = range(1, 9),
           thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """The best fixed setting and the best adaptive one by :func:`replay`:
    ``{"fixed": (layer, k, predicted), "adaptive": (layer, k, threshold, predicted)}``."""
    fixed = adaptive = None
    for layer, cost in draft_costs.items():
        for k in ks:
            p = replay(stats, layer, k, None, cost)
            if fixed is None or p > fixed[2]:
                fixed = (layer, k, p)
            for t in thresholds:
                p = replay(stats, layer, k, t, cost)
                if adaptive is None or p > adaptive[3]:
                    adaptive = (layer, k, t, p)
    return {"fixed": fixed, "adaptive": adaptive}


def measure_and_choose(model: torch.nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                       vocab: Optional[Sequence[int]] = None, steps: int = 12, context: int = 32,
                       clock: str = "cpu") -> tuple[DraftStats, dict[int, float], dict]:
    """:func:`draft_stats` on ``answers`` (the full model's greedy answers), each exit's draft step cost over a
    full step measured here (:func:`nemo_ee.inference.bench.step_costs`), and :func:`choose` on both:
    ``(stats, {exit layer: draft cost}, choice)``."""
    ee = model.ee_config
    stats = draft_stats(model, prompts, answers, vocab)
    costs = step_costs(model, steps=steps, context=context, clock=clock,
                       vocab=tuple(vocab) if vocab is not None else None)["depth_seconds"]
    draft_costs = {ee.exit_layer_nums[i]: costs[model.exits[str(i)].point] / costs[ee.num_layers]
                   for i in model.local_exit_indices if model.exits[str(i)].point in costs}
    return stats, draft_costs, choose(stats, draft_costs)


def best(choice: dict) -> dict:
    """The better predicted of :func:`choose`'s two settings, as ``{draft_exit, num_draft, draft_threshold
    (None: fixed length), predicted_speedup}``."""
    (f_layer, f_k, f_pred), (a_layer, a_k, a_t, a_pred) = choice["fixed"], choice["adaptive"]
    if a_pred > f_pred:
        return {"draft_exit": int(a_layer), "num_draft": int(a_k), "draft_threshold": float(a_t),
                "predicted_speedup": round(float(a_pred), 4)}
    return {"draft_exit": int(f_layer), "num_draft": int(f_k), "draft_threshold": None,
            "predicted_speedup": round(float(f_pred), 4)}
