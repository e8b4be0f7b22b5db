"""Exit-threshold calibration: per exit, the loosest threshold that keeps greedy agreement with the full model.

What it does, precisely (CALM-style consistency target, without CALM's statistical testing):

1. **Reference**: greedy full-model decoding of every calibration prompt (``max_tokens`` new tokens each,
   no stop tokens) with the cached decoder.
2. **Statistics**: one teacher-forced megatron forward per sequence (prompt + full tokens) gives every
   exit's logits at every generated position. Per exit and position: the policy's statistic
   (:func:`nemo_ee.inference.policies.confidence`) and whether the exit's argmax is the full model's token.
   Because KV recomputation is exact, these are the decisions early-exit decoding would face as long as
   its sequence follows the full model's.
3. **Thresholds**, exits in depth order: the candidates of an exit are the positions no shallower exit
   already took (at the thresholds chosen for them). Sorting them by confidence, a threshold lets the
   top group exit; the chosen threshold is the **loosest** one whose agreement among the positions it lets
   exit is >= the token target (agreement need not be monotone in the threshold; we take the loosest over
   all candidates, so every looser candidate misses). Thresholds sit halfway between consecutive distinct
   statistic values, so float noise between the cached and the teacher-forced forward does not flip a
   decision. An exit where no threshold reaches the target is disabled (left out of ``exit_thresholds``).
   With ``exit_vocab_size`` N, the exits score only the N most frequent tokens of the calibration prompts and
   the full model's answers to them (an *exit vocabulary*: each exit reads N rows of its output matrix instead of all,
   so an exit that does not fire costs a sliver of a step); statistics and argmax are taken over those ids.
4. **Verification**: real early-exit decoding (:func:`nemo_ee.inference.generate.generate`) of the same
   prompts at the chosen thresholds; measured agreement = share of positions whose token equals the full
   model's token at that position (one divergence changes the rest of the sequence, so this is stricter
   than the per-token target). If it falls short of ``target``, the token target is tightened (its miss
   rate halved, ``max_rounds`` times, then 1.0) and steps 3-4 rerun on the same statistics. The result
   says whether the target was met.
5. **Self-speculative settings** (``choose_draft=True``): the draft exit, draft length and adaptive threshold
   that :mod:`nemo_ee.inference.draft_choice` predicts fastest on the same answers (teacher-forced draft
   agreement and confidence, step costs measured on this machine), written as ``inference.self_speculative``
   so that a self-speculative request without its own settings uses them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

from nemo_ee.inference import draft_choice
from nemo_ee.inference.generate import GenerationParams, check_prompt, generate
from nemo_ee.inference.policies import POLICIES, confidence


def check_calibration_args(target: float, policy: str, max_tokens: int = 1, max_rounds: int = 0) -> None:
    """Clear errors for a target outside (0, 1], an unknown policy or a bad token / round count."""
    if policy not in POLICIES:
        raise ValueError(f"exit policy {policy!r} is not one of {list(POLICIES)}")
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"target {target!r} is not a number") from None
    if not (0.0 < target <= 1.0):
        raise ValueError(f"target {target} is outside (0, 1]: it is the share of tokens that must agree")
    if int(max_tokens) != max_tokens or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be an integer >= 1")
    if int(max_rounds) != max_rounds or max_rounds < 0:
        raise ValueError(f"max_rounds={max_rounds} must be an integer >= 0")


@dataclasses.dataclass
class ExitStatistics:
    """Per exit (depth order) and generated position: the policy statistic and agreement with the full model."""

    policy: str
    layers: list          # exit layer numbers, depth order
    stats: torch.Tensor   # [exits, positions] float
    agree: torch.Tensor   # [exits, positions] bool: exit argmax == full model's greedy token
    full_tokens: list     # per prompt: the full model's greedy tokens
    vocab_size: int
    exit_vocab: Optional[tuple] = None  # the ids the exits score (None: all)

    @property
    def n_tokens(self) -> int:
        return int(self.stats.shape[1])


def _exit_order(model: torch.nn.Module) -> list[int]:
    return sorted(model.local_exit_indices, key=lambda i: (model.exits[str(i)].point, i))


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not progress)


def frequent_tokens(sequences: Sequence[Sequence[int]], size: int) -> tuple:
    """The ``size`` most frequent ids of ``sequences`` (all of them when fewer), sorted by id."""
    import collections

    counts = collections.Counter(t for seq in sequences for t in seq)
    return tuple(sorted(t for t, _ in counts.most_common(int(size))))


@torch.no_grad()
def collect_statistics(model: torch.nn.Module, prompts: Sequence[Sequence[int]], policy: str = "max_prob",
                       max_tokens: int = 32, batch_size: int = 8, progress: bool = True,
                       exit_vocab_size: Optional[int] = None) -> ExitStatistics:
    """Full greedy decoding of ``prompts``, then each exit's statistic and agreement at every new position."""
    check_calibration_args(1.0, policy, max_tokens)
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no calibration prompts given")
    for p in prompts:
        check_prompt(p, model)
    ee = model.ee_config
    if not ee.exit_layer_nums:
        raise ValueError("the model has no exits: nothing to calibrate")
    if exit_vocab_size is not None and (int(exit_vocab_size) != exit_vocab_size or exit_vocab_size < 1):
        raise ValueError(f"exit_vocab_size={exit_vocab_size} must be an integer >= 1 (or None: every token)")
    order = _exit_order(model)
    full = GenerationParams(max_tokens=int(max_tokens), decode_mode="full")
    stats: list[list[torch.Tensor]] = [[] for _ in order]
    agree: list[list[torch.Tensor]] = [[] for _ in order]
    full_tokens: list = []
    model.eval()
    batches = list(_batches(prompts, max(1, int(batch_size))))
    with _bar(len(prompts), "calibration: full greedy decoding", progress) as bar:
        answers = []
        for batch in batches:
            answers.append(generate(model, batch, full))
            bar.update(len(batch))
    vocab = None
    if exit_vocab_size is not None:
        vocab = frequent_tokens(prompts + [g.token_ids for gens in answers for g in gens], exit_vocab_size)
    vocab_ids = torch.tensor(vocab) if vocab is not None else None
    with _bar(len(prompts), "calibration: exit statistics", progress) as bar:
        for batch, gens in zip(batches, answers):
            seqs = [p + g.token_ids[:-1] for p, g in zip(batch, gens)]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # right padding: causal, never read
            out = model(ids, torch.arange(width).expand_as(ids), None)
            for row, (p, g) in enumerate(zip(batch, gens)):
                span = slice(len(p) - 1, len(p) - 1 + len(g.token_ids))
                target = torch.tensor(g.token_ids)
                for e, index in enumerate(order):
                    logits = out.exits[index][row, span].float()
                    if vocab_ids is not None:
                        logits = logits[:, vocab_ids]
                    stats[e].append(confidence(policy, logits))
                    pick = logits.argmax(dim=-1)
                    agree[e].append((vocab_ids[pick] if vocab_ids is not None else pick) == target)
                full_tokens.append(list(g.token_ids))
            bar.update(len(batch))
    return ExitStatistics(policy, [ee.exit_layer_nums[i] for i in order],
                          torch.stack([torch.cat(s) for s in stats]), torch.stack([torch.cat(a) for a in agree]),
                          full_tokens, int(ee.vocab_size) if vocab is None else len(vocab), vocab)


def fires(policy: str, stats: torch.Tensor, threshold: float) -> torch.Tensor:
    """The exit rule on precomputed statistics (the same comparison as ExitRule.fires)."""
    return stats <= threshold if policy == "entropy" else stats >= threshold


def _score(policy: str, stats: torch.Tensor) -> torch.Tensor:
    return -stats if policy == "entropy" else stats  # higher = more confident


def _loose_bound(policy: str, vocab_size: int) -> float:
    """The most confident-free score: every position's score is >= it (0 prob / margin, -log V entropy)."""
    return -math.log(vocab_size) if policy == "entropy" else 0.0


def loosest_threshold(policy: str, stats: torch.Tensor, agree: torch.Tensor, target: float,
                      vocab_size: int) -> tuple[Optional[float], int, float]:
    """(threshold, positions it lets exit, their agreement) for one exit; (None, 0, nan) if none reaches ``target``.

    Candidates: midpoints between consecutive distinct statistic values (and past the least confident one).
    """
    if stats.numel() == 0:
        return None, 0, float("nan")
    score = _score(policy, stats.double())
    order = torch.argsort(score, descending=True)
    score, ok = score[order], agree[order].double()
    cum = torch.cumsum(ok, 0) / torch.arange(1, len(ok) + 1, dtype=torch.float64)
    # group ends: the last position of each run of equal scores (a threshold cannot split a tie)
    ends = torch.nonzero(torch.cat([score[1:] != score[:-1], torch.tensor([True])])).flatten()
    good = ends[cum[ends] >= target - 1e-12]
    if len(good) == 0:
        return None, 0, float("nan")
    k = int(good[-1])
    below = float(score[k + 1]) if k + 1 < len(score) else _loose_bound(policy, vocab_size)
    mid = (float(score[k]) + below) / 2
    threshold = -mid if policy == "entropy" else mid
    return max(threshold, 0.0), k + 1, float(cum[k])


def choose_thresholds(data: ExitStatistics, token_target: float) -> dict:
    """Per exit layer, depth order: {"threshold" (None = disabled), "candidates", "exited", "agreement"}."""
    remaining = torch.ones(data.n_tokens, dtype=torch.bool)
    chosen = {}
    for e, layer in enumerate(data.layers):
        stats, agree = data.stats[e][remaining], data.agree[e][remaining]
        threshold, exited, agreement = loosest_threshold(data.policy, stats, agree, token_target, data.vocab_size)
        chosen[layer] = {"threshold": threshold, "candidates": int(remaining.sum()), "exited": exited,
                         "agreement": agreement}
        if threshold is not None:
            remaining &= ~fires(data.policy, data.stats[e], threshold)
    return chosen


def positional_agreement(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Share of reference positions whose token is the same in ``tokens`` (sequence by sequence)."""
    total = sum(len(r) for r in reference)
    same = sum(int(a == b) for t, r in zip(tokens, reference) for a, b in zip(t, r))
    return same / total if total else 1.0


@torch.no_grad()
def verify(model: torch.nn.Module, prompts: Sequence[Sequence[int]], reference: Sequence[Sequence[int]],
           policy: str, thresholds: dict, max_tokens: int, batch_size: int = 8, progress: bool = True,
           exit_vocab: Optional[tuple] = None) -> dict:
    """Early-exit greedy decoding at ``thresholds`` ({layer: thr}): agreement with ``reference`` and exit depths."""
    if not thresholds:  # every exit disabled: decoding is full decoding, identical to the reference
        n = sum(len(r) for r in reference)
        return {"agreement": 1.0, "mean_exit_depth": float(model.ee_config.num_layers), "tokens": n}
    params = GenerationParams(max_tokens=int(max_tokens), exit_policy=policy, exit_thresholds=dict(thresholds),
                              exit_vocab=exit_vocab)
    tokens, depths = [], []
    with _bar(len(prompts), "calibration: early-exit verification", progress) as bar:
        for batch in _batches([list(p) for p in prompts], max(1, int(batch_size))):
            for g in generate(model, batch, params):
                tokens.append(g.token_ids)
                depths.extend(g.exit_layers)
            bar.update(len(batch))
    return {"agreement": positional_agreement(tokens, reference),
            "mean_exit_depth": sum(depths) / max(1, len(depths)), "tokens": len(depths)}


@dataclasses.dataclass
class CalibrationResult:
    """Chosen thresholds ({exit layer: threshold}; disabled exits left out) and how they were measured."""

    policy: str
    target: float
    thresholds: dict
    per_exit: dict
    token_target: float
    measured_agreement: float
    mean_exit_depth: float
    met: bool
    n_prompts: int
    n_tokens: int
    rounds: int
    exit_vocab: Optional[tuple] = None
    draft: Optional[dict] = None  # {draft_exit, num_draft, draft_threshold, predicted_speedup}

    def inference_section(self) -> dict:
        """The .nemo config's ``inference`` section (read by loading.inference_defaults)."""
        section = {
            "exit_policy": self.policy,
            "exit_thresholds": {int(k): float(v) for k, v in self.thresholds.items()},
            "calibration": {
                "target": float(self.target), "policy": self.policy, "n_prompts": self.n_prompts,
                "n_tokens": self.n_tokens, "measured_agreement": round(float(self.measured_agreement), 6),
                "token_target": float(self.token_target), "met": bool(self.met),
                "mean_exit_depth": round(float(self.mean_exit_depth), 4), "rounds": self.rounds,
                "disabled_exits": [int(k) for k, v in self.per_exit.items() if v["threshold"] is None],
            },
        }
        if self.exit_vocab is not None:
            section["exit_vocab"] = [int(t) for t in self.exit_vocab]
        if self.draft is not None:
            section["self_speculative"] = dict(self.draft)
        return section


def token_targets(target: float, max_rounds: int) -> list[float]:
    """The per-token targets tried in turn: ``target``, then the miss rate halved ``max_rounds`` times, then 1.0."""
    miss = 1.0 - float(target)
    out = [1.0 - miss / 2 ** r for r in range(int(max_rounds) + 1)] + [1.0]
    return sorted(set(out), key=out.index)


def calibrate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], target: float = 0.98,
              policy: str = "max_prob", max_tokens: int = 32, batch_size: int = 8, max_rounds: int = 3,
              progress: bool = True, exit_vocab_size: Optional[int] = None,
              choose_draft: bool = False) -> CalibrationResult:
    """Per-exit thresholds meeting ``target`` greedy agreement on ``prompts``, verified by early-exit decoding
    (with ``exit_vocab_size``, over the exit vocabulary it chooses; see the module docstring)."""
    check_calibration_args(target, policy, max_tokens, max_rounds)
    data = collect_statistics(model, prompts, policy, max_tokens, batch_size, progress, exit_vocab_size)
    measured, last_thresholds, rounds = None, None, 0
    for token_target in token_targets(target, max_rounds):
        chosen = choose_thresholds(data, token_target)
        thresholds = {k: v["threshold"] for k, v in chosen.items() if v["threshold"] is not None}
        if thresholds != last_thresholds:
            measured = verify(model, prompts, data.full_tokens, policy, thresholds, max_tokens, batch_size, progress,
                              data.exit_vocab)
            rounds += 1
            last_thresholds = thresholds
        if measured["agreement"] >= float(target):
            break
    draft = draft_settings(model, prompts, data.full_tokens, data.exit_vocab) if choose_draft else None
    return CalibrationResult(policy, float(target), thresholds, chosen, token_target, measured["agreement"],
                             measured["mean_exit_depth"], measured["agreement"] >= float(target),
                             len(prompts), data.n_tokens, rounds, data.exit_vocab, draft)


def draft_settings(model: torch.nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                   exit_vocab: Optional[tuple] = None) -> dict:
    """The self-speculative settings predicted fastest on ``answers`` (the full model's greedy answers), with
    draft and full step costs measured here: the better of the best fixed length and the best adaptive one."""
    _, _, choice = draft_choice.measure_and_choose(model, prompts, answers, exit_vocab)
    return draft_choice.best(choice)


def format_result(result: CalibrationResult, num_layers: int) -> str:
    """A human-readable table of the calibration."""
    lines = [f"calibration: policy={result.policy} target={result.target} prompts={result.n_prompts} "
             f"tokens={result.n_tokens} token_target={result.token_target:.4f} rounds={result.rounds}"
             + (f" exit_vocab={len(result.exit_vocab)} ids" if result.exit_vocab is not None else "")]
    for layer, info in result.per_exit.items():
        thr = "disabled" if info["threshold"] is None else f"{info['threshold']:.6f}"
        agreement = "-" if info["threshold"] is None else f"{info['agreement']:.4f}"
        lines.append(f"  exit l{layer}: threshold={thr} exits {info['exited']}/{info['candidates']} "
                     f"remaining tokens (teacher-forced agreement {agreement})")
    lines.append(f"verified early-exit decoding: agreement={result.measured_agreement:.4f} "
                 f"({'meets' if result.met else 'MISSES'} target {result.target}) "
                 f"mean_exit_depth={result.mean_exit_depth:.3f}/{num_layers}")
    if result.draft is not None:
        d = result.draft
        lines.append(f"self-speculative: draft at layer {d['draft_exit']}, up to {d['num_draft']} drafts, threshold "
                     f"{d['draft_threshold']} (predicted {d['predicted_speedup']:.3f}x full decoding)")
    return "\n".join(lines)
