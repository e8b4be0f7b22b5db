"""Measurements behind scripts/bench_decode.py: early-exit vs full decoding, side by side, on one model.

Every timing alternates the two sides prompt by prompt (EE, full, full, EE, ...) so drift on a shared
machine hits both, excludes warm-up, and reports medians. Quality is measured without timing:
agreement by teacher-forcing the early-exit output through the full model, perplexity by
teacher-forcing validation text and taking each position's distribution from the exit the rule picks.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

from nemo_ee.inference.engine import EarlyExitEngine
from nemo_ee.inference.generate import Generation, GenerationParams, generate
from nemo_ee.inference.policies import ExitRule, confidence
from nemo_ee.inference.speculative import generate_self_speculative

CSV_COLUMNS = ("threshold", "ee_tok_s", "full_tok_s", "speedup", "mean_depth", "ideal_speedup", "efficiency",
               "agreement", "agreement_prefix", "val_ppl", "speedup_wall")


def thresholds(step: float) -> list[float]:
    """1.0 down to 0.0 in steps of ``step`` (both ends included, rounded to 4 decimals)."""
    n = int(round(1.0 / step))
    values = [round(1.0 - i * step, 4) for i in range(n + 1)]
    return values if values[-1] <= 0.0 else values + [0.0]


def validation_windows(nemo: Any, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens, evenly spaced over the model's validation split."""
    if length > nemo.ee_config.seq_length + 1:
        raise ValueError(f"windows of {length} tokens exceed the model's seq_length {nemo.ee_config.seq_length} + 1")
    _, val = nemo._datasets()  # tokenized once and cached on disk (nemo_ee.data.build_datasets)
    picks = [int(i * len(val) / count) for i in range(count)]
    items = [val[i % len(val)] for i in picks]
    return [torch.cat([x["tokens"], x["labels"][-1:]])[:length].tolist() for x in items]


def exit_order(model: torch.nn.Module) -> list[int]:
    """Global exit indices, shallowest first (the order a decode step tries them)."""
    return sorted(model.local_exit_indices, key=lambda i: (model.exits[str(i)].point, i))


@dataclasses.dataclass
class TeacherForced:
    """Per validation position: each exit's confidence, NLL of the true token and argmax, and the final's."""

    conf: dict[int, torch.Tensor]
    nll: dict[int, torch.Tensor]
    argmax: dict[int, torch.Tensor]
    final_nll: torch.Tensor
    final_argmax: torch.Tensor

    def picked_nll(self, rule: ExitRule, order: Sequence[int], policy: str) -> torch.Tensor:
        """NLL per position of the distribution the rule decodes from (first exit that fires, else final)."""
        nll, left = self.final_nll.clone(), torch.ones_like(self.final_nll, dtype=torch.bool)
        for index in order:
            t = rule.threshold_at(index)
            if t is None or not rule.uses(index):
                continue
            fires = (self.conf[index] <= t) if policy == "entropy" else (self.conf[index] >= t)
            take = left & fires
            nll[take] = self.nll[index][take]
            left &= ~fires
        return nll

    def acceptance(self, index: int) -> float:
        """Share of positions where exit ``index``'s greedy token equals the final layer's (draft acceptance)."""
        return float((self.argmax[index] == self.final_argmax).float().mean())


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, windows: Sequence[Sequence[int]], policy: str = "max_prob",
                   chunk: int = 8, vocab: Optional[Sequence[int]] = None) -> TeacherForced:
    """Run validation windows (tokens[:-1] -> tokens[1:]) through the model, keeping small per-position stats.
    ``vocab``: the exits score only these ids (an exit vocabulary; a token outside it has infinite NLL there)."""
    order = exit_order(model)
    outside = None
    if vocab is not None:
        outside = torch.ones(model.ee_config.vocab_size, dtype=torch.bool)
        outside[list(vocab)] = False
    parts: dict[str, list] = {"final_nll": [], "final_argmax": []}
    per_exit = {k: {i: [] for i in order} for k in ("conf", "nll", "argmax")}
    for start in range(0, len(windows), chunk):
        seq = torch.tensor([list(w) for w in windows[start:start + chunk]])
        ids, labels = seq[:, :-1], seq[:, 1:]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        out = model(ids, pos, None)
        for index in order:
            logits = out.exits[index].float()
            if outside is not None:
                logits = logits.masked_fill(outside, -math.inf)
            per_exit["conf"][index].append(confidence(policy, logits).flatten())
            per_exit["nll"][index].append(_nll(logits, labels))
            per_exit["argmax"][index].append(logits.argmax(-1).flatten())
        parts["final_nll"].append(_nll(out.output.float(), labels))
        parts["final_argmax"].append(out.output.argmax(-1).flatten())
    cat = torch.cat
    return TeacherForced({i: cat(v) for i, v in per_exit["conf"].items()}, {i: cat(v) for i, v in per_exit["nll"].items()},
                         {i: cat(v) for i, v in per_exit["argmax"].items()}, cat(parts["final_nll"]),
                         cat(parts["final_argmax"]))


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")


@torch.no_grad()
def full_greedy_targets(model: torch.nn.Module, prompt: Sequence[int], tokens: Sequence[int]) -> list[int]:
    """The full model's greedy token at each generated position, given the generated prefix (teacher-forced)."""
    seq = torch.tensor([list(prompt) + list(tokens)])
    ids = seq[:, :-1]
    logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None).output
    return logits[0, len(prompt) - 1:].argmax(-1).tolist()


def agreement(model: torch.nn.Module, gens: Sequence[Generation], full: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(share of tokens equal to the full model's greedy token given the same prefix,
    share of tokens before each output first departs from full greedy decoding)."""
    same = total = prefix = 0
    for gen, reference in zip(gens, full):
        target = full_greedy_targets(model, gen.prompt_ids, gen.token_ids)
        same += sum(int(a == b) for a, b in zip(gen.token_ids, target))
        total += len(gen.token_ids)
        n = 0
        while n < min(len(gen.token_ids), len(reference)) and gen.token_ids[n] == reference[n]:
            n += 1
        prefix += n
    return same / max(1, total), prefix / max(1, total)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(fn: Callable[[], Any], clock: str = "wall") -> tuple[float, Any]:
    """(seconds of ``clock`` -- "wall" or "cpu", this process's CPU time -- spent in one call, its result)."""
    now = CLOCKS[clock]
    started = now()
    result = fn()
    return now() - started, result


def paired(run_a: Callable[[int], Any], run_b: Callable[[int], Any], count: int, repeats: int = 1,
           clock: str = "cpu") -> dict:
    """Alternate a and b over ``count`` items (a first on even items, b first on odd), ``repeats`` times.

    Returns, for ``clock``, the median seconds of each side ("a", "b") and the median of per-item
    ratios b/a ("ratio"); the same ratio in wall-clock time ("ratio_wall"); each item's last results.
    CPU time (one intra-op thread) is the decoder's own work, unaffected by other processes taking the
    cores; wall time is what a user waits for on an idle machine.
    """
    times = {("a", c): [] for c in CLOCKS} | {("b", c): [] for c in CLOCKS}
    outs = {"a": [None] * count, "b": [None] * count}

    def one(side: str, fn: Callable[[int], Any], i: int) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        outs[side][i] = fn(i)
        times[(side, "cpu")].append(time.process_time() - c0)
        times[(side, "wall")].append(time.perf_counter() - w0)

    for rep in range(repeats):
        for i in range(count):
            order = (("a", run_a), ("b", run_b)) if (i + rep) % 2 == 0 else (("b", run_b), ("a", run_a))
            for side, fn in order:
                one(side, fn, i)
    ratio = {c: statistics.median(b / a for a, b in zip(times[("a", c)], times[("b", c)])) for c in CLOCKS}
    return {"a": statistics.median(times[("a", clock)]), "b": statistics.median(times[("b", clock)]),
            "ratio": ratio[clock], "ratio_wall": ratio["wall"], "out_a": outs["a"], "out_b": outs["b"]}


@torch.no_grad()
def step_costs(model: torch.nn.Module, steps: int = 40, context: int = 32,
               twin: Optional[torch.nn.Module] = None, clock: str = "cpu", vocab: Optional[tuple] = None) -> dict:
    """Decode-step seconds (batch 1) at each exit depth (forced exit) and at full depth, and a linear fit.

    Every (model, depth) is timed round-robin (drift hits all alike), the first steps excluded, medians
    kept. Returns ``{"depth_seconds": {depth: s}, "per_layer": s, "fixed": s}``; ``fixed`` is what a step
    costs besides its layers (embedding, the head, bookkeeping), extrapolated to depth 0. With ``twin``
    (the same architecture at another width, see :func:`narrow_twin`) also ``"twin_per_layer"``. ``vocab``:
    the exits score only these ids (an exit vocabulary; the model only).
    """
    cases = [(name, m, d, rule) for name, m in (("model", model), ("twin", twin)) if m is not None
             for d, rule in _depth_rules(m, vocab if name == "model" else None).items()]
    engines = []
    for name, m, d, rule in cases:
        ctx = min(context, m.ee_config.max_positions // 2)
        engine = EarlyExitEngine(m, 1, ctx + 2)
        engine.step([0], [[1] * ctx], [ExitRule.full()])
        engines.append((engine, ctx))
    times: list[list[float]] = [[] for _ in cases]
    for i in range(steps):
        for j, ((engine, ctx), (_, _, _, rule)) in enumerate(zip(engines, cases)):
            t, _ = timed(lambda: engine.step([0], [[1]], [rule]), clock)
            engine.truncate(0, ctx)
            if i >= min(5, steps // 4):
                times[j].append(t)
    out: dict = {}
    for name in ("model", "twin"):
        points = {d: statistics.median(times[j]) for j, (n, _, d, _) in enumerate(cases) if n == name}
        if points and name == "model":
            out.update(_fit(points))
        elif points:
            out["twin_per_layer"] = _fit(points)["per_layer"]
    return out


def _depth_rules(model: torch.nn.Module, vocab: Optional[tuple] = None) -> dict:
    rules = {model.ee_config.num_layers: ExitRule.full()}
    for index in exit_order(model):
        rules.setdefault(model.exits[str(index)].point, ExitRule(forced=index, vocab=vocab))
    return rules


def _fit(points: dict) -> dict:
    """Least-squares line through {depth: seconds}."""
    depths = sorted(points)
    if len(depths) < 2:
        return {"depth_seconds": points, "per_layer": points[depths[0]] / depths[0], "fixed": 0.0}
    n, mx = len(depths), sum(depths) / len(depths)
    my = sum(points[d] for d in depths) / n
    slope = sum((d - mx) * (points[d] - my) for d in depths) / sum((d - mx) ** 2 for d in depths)
    return {"depth_seconds": points, "per_layer": slope, "fixed": my - slope * mx}


def narrow_twin(model: torch.nn.Module, hidden: int = 64) -> torch.nn.Module:
    """The same architecture (layers, exits, vocabulary) at hidden ``hidden``, random weights.

    Its per-layer decode time is dispatch and Python, almost no arithmetic: an estimate of the
    overhead inside each layer of ``model``.
    """
    from nemo_ee.models import build_model

    ee = model.ee_config
    heads = ee.num_attention_heads if hidden % ee.num_attention_heads == 0 else 4
    small = dataclasses.replace(ee, hidden_size=hidden, ffn_hidden_size=4 * hidden, num_attention_heads=heads,
                                num_query_groups=None)
    return build_model(small).eval()


def predicted_selfspec(alpha: float, k: int, draft_s: float, full_s: float) -> float:
    """Predicted speedup of k drafts at acceptance ``alpha`` (i.i.d.): E[tokens per cycle] x full / cycle cost."""
    expected = float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return expected * full_s / (k * draft_s + full_s)


def choose_draft(model: torch.nn.Module, tf: TeacherForced, costs: dict, ks: Sequence[int] = range(1, 9)) -> tuple:
    """(draft exit layer, num_draft, predicted speedup) maximising :func:`predicted_selfspec`."""
    L = model.ee_config.num_layers
    best = None
    for index in exit_order(model):
        point = model.exits[str(index)].point
        alpha = tf.acceptance(index)
        for k in ks:
            p = predicted_selfspec(alpha, k, costs["depth_seconds"][point], costs["depth_seconds"][L])
            if best is None or p > best[2]:
                best = (model.ee_config.exit_layer_nums[index], k, p)
    return best


def sweep_row(model: torch.nn.Module, prompts: list, full_tokens: list, t: float, args: Any,
              tf: TeacherForced, policy: str = "max_prob", exit_vocab: Optional[tuple] = None) -> tuple[dict, list[Generation]]:
    """One threshold: paired EE/full timings, depth, agreement, perplexity and exit shares (``exit_vocab``: the
    exits score only those ids; ``tf`` must then be computed with the same vocabulary)."""
    L = model.ee_config.num_layers
    ee = GenerationParams(max_tokens=args.new_tokens, exit_policy=policy, threshold=t, exit_vocab=exit_vocab)
    full = GenerationParams(max_tokens=args.new_tokens)
    res = paired(lambda i: generate(model, [prompts[i]], ee)[0], lambda i: generate(model, [prompts[i]], full)[0],
                 len(prompts), args.repeats, args.clock)
    gens = res["out_a"]
    for gen, ref in zip(res["out_b"], full_tokens):
        if gen.token_ids != ref:
            raise RuntimeError("full-model greedy decoding changed between runs: the timing comparison is void")
    depths = [d for g in gens for d in g.exit_layers]
    mean_depth = sum(depths) / len(depths)
    speedup, ideal = res["ratio"], L / mean_depth
    agree, agree_prefix = agreement(model, gens, full_tokens)
    rule = ee.rule(model.ee_config.exit_layer_nums)
    ppl = math.exp(float(tf.picked_nll(rule, exit_order(model), policy).mean()))
    row = {"threshold": t, "ee_tok_s": args.new_tokens / res["a"], "full_tok_s": args.new_tokens / res["b"],
           "speedup": speedup, "mean_depth": mean_depth, "ideal_speedup": ideal, "efficiency": speedup / ideal,
           "agreement": agree, "agreement_prefix": agree_prefix, "val_ppl": ppl, "speedup_wall": res["ratio_wall"]}
    for depth in depth_levels(model):
        row[f"share_l{depth}"] = sum(d == depth for d in depths) / len(depths)
    return row, gens


def depth_levels(model: torch.nn.Module) -> list[int]:
    """Depths a token can leave at: each exit's point and the final layer."""
    return sorted({model.exits[str(i)].point for i in exit_order(model)} | {model.ee_config.num_layers})


def operating_point(rows: Sequence[dict], target: float) -> Optional[dict]:
    """The row of the loosest (lowest) threshold whose agreement is >= ``target`` (None if none is)."""
    ok = [r for r in rows if r["agreement"] >= target]
    return min(ok, key=lambda r: r["threshold"]) if ok else None


def selfspec(model: torch.nn.Module, prompts: list, full_tokens: list, args: Any, draft_exit: int,
             num_draft: int, exit_vocab: Optional[tuple] = None) -> dict:
    """Self-speculative greedy vs full greedy, paired per prompt: speedup and whether every output is identical."""
    spec = GenerationParams(max_tokens=args.new_tokens, decode_mode="self_speculative", draft_exit=draft_exit,
                            num_draft=num_draft, exit_vocab=exit_vocab)
    full = GenerationParams(max_tokens=args.new_tokens)
    res = paired(lambda i: generate_self_speculative(model, prompts[i], spec),
                 lambda i: generate(model, [prompts[i]], full)[0], len(prompts), args.repeats, args.clock)
    identical = all(g.token_ids == ref for g, ref in zip(res["out_a"], full_tokens))
    drafted = [d for g in res["out_a"] for d in g.exit_layers]
    L = model.ee_config.num_layers
    return {"speedup": res["ratio"], "speedup_wall": res["ratio_wall"], "identical": identical, "spec_tok_s": args.new_tokens / res["a"],
            "full_tok_s": args.new_tokens / res["b"], "draft_share": sum(d < L for d in drafted) / len(drafted)}


def batched(model: torch.nn.Module, prompts: list, args: Any, threshold: float, repeats: int = 3) -> dict:
    """One batch of all ``prompts`` with the early-exit rule vs at full depth: tokens/s of each, speedup."""
    ee = GenerationParams(max_tokens=args.new_tokens, threshold=threshold)
    full = GenerationParams(max_tokens=args.new_tokens)
    generate(model, prompts, ee), generate(model, prompts, full)  # warm-up
    res = paired(lambda _: generate(model, prompts, ee), lambda _: generate(model, prompts, full), 1, repeats,
                 args.clock)
    tokens = len(prompts) * args.new_tokens
    depths = [d for g in res["out_a"][0] for d in g.exit_layers]
    return {"ee_tok_s": tokens / res["a"], "full_tok_s": tokens / res["b"], "speedup": res["ratio"],
            "speedup_wall": res["ratio_wall"],
            "mean_depth": sum(depths) / len(depths)}


def result_line(op: Optional[dict], spec: dict, batch: dict) -> str:
    """The benchmark's last line (format fixed by issue 5)."""
    e = op["efficiency"] if op else float("nan")
    s = op["speedup"] if op else float("nan")
    return (f"RESULT efficiency={e:.3f} speedup_at_98={s:.3f} selfspec_speedup={spec['speedup']:.3f} "
            f"selfspec_identical={'true' if spec['identical'] else 'false'} batched_speedup={batch['speedup']:.3f}")
