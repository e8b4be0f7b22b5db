"""Lossless self-speculative decoding (LayerSkip-style) with the model's own early exit as the draft.

Draft: up to k tokens, each leaving at the draft exit (layers up to it, plus its head). With a
``draft_threshold`` the draft length adapts (Kangaroo / DEL style): a row stops drafting as soon as the
draft exit's max probability falls below it. Verify: the last draft goes through the full model, and in
the same forward each deeper layer first processes the drafted positions it is missing; the layers below
the exit reuse the KV the drafts already wrote. The final logits of those positions decide: greedy keeps
the drafts that equal the full model's argmax and appends its correction (so the output is the full
model's greedy output); with sampling, speculative rejection sampling keeps the full model's distribution.
Rejected positions are truncated, per row.

:class:`SelfSpeculation` is one request's state on one engine row, so the in-flight batcher
(:mod:`nemo_ee.inference.scheduler`) runs self-speculative rows in its batch: every row drafts, rows
verify in the same batched forward with ragged acceptance (each row keeps its own number of drafts and
truncates its own KV), and rows of the other modes share the step.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from nemo_ee.inference.engine import EarlyExitEngine
from nemo_ee.inference.generate import Generation, GenerationParams, check_prompt, context_limit
from nemo_ee.inference.policies import ExitRule, confidence
from nemo_ee.inference.sampling import probabilities, sample


def draft_exit_index(model: torch.nn.Module, draft_exit: int | None) -> int:
    """The global index of the draft exit given by its layer number (None: the shallowest exit)."""
    layers = list(model.ee_config.exit_layer_nums)
    if not layers:
        raise ValueError("self-speculative decoding needs a model with at least one exit")
    if draft_exit is None:
        return min(range(len(layers)), key=lambda i: (model.exits[str(i)].point, i))
    if int(draft_exit) not in layers:
        raise ValueError(f"draft_exit={draft_exit} is not an exit layer of this model (exits at {layers})")
    return layers.index(int(draft_exit))


def _accept(draft_tokens, draft_probs, final_logits, params, generator) -> tuple[list[int], int]:
    """(accepted drafts + the next token, number of accepted drafts)."""
    sampling = params.sampling
    if sampling.greedy:
        target = final_logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(draft_tokens) and draft_tokens[n] == target[n]:
            n += 1
        return draft_tokens[:n] + [target[n]], n
    target = probabilities(final_logits.cpu(), sampling)  # drafts' probabilities and the generator are on the CPU
    for n, (token, q) in enumerate(zip(draft_tokens, draft_probs)):
        p = target[n]
        if float(torch.rand((), generator=generator, device=generator.device)) * float(q[token]) > float(p[token]):
            residual = (p - q).clamp_min(0.0)
            residual = residual / residual.sum() if float(residual.sum()) > 0 else p
            return draft_tokens[:n] + [int(torch.multinomial(residual, 1, generator=generator))], n
    return draft_tokens + [int(torch.multinomial(target[len(draft_tokens)], 1, generator=generator))], len(draft_tokens)


class SelfSpeculation:
    """One self-speculative request after its prefill: what to feed its engine row next, and what the
    step that fed it decided. Alternates drafting steps (one token each, forced out at the draft exit)
    with a verify step (the last draft at full depth, with the final logits of every drafted position)."""

    def __init__(self, model: torch.nn.Module, params: GenerationParams) -> None:
        self.index = draft_exit_index(model, params.draft_exit)
        self.depth = model.exits[str(self.index)].point
        self.full_depth = model.ee_config.num_layers
        self.draft_rule, self.full_rule = ExitRule(forced=self.index, vocab=params.exit_vocab), ExitRule.full()
        self.params, self.sampling = params, params.sampling
        self.drafts: list[int] = []
        self.draft_probs: list[torch.Tensor] = []
        self.base = 0         # position of the token the current drafts follow
        self.limit = 0        # drafts allowed this round
        self.verifying = False

    def plan(self, position: int, remaining: int) -> tuple[ExitRule, Optional[int]]:
        """(rule, final_from) for the next step of a row whose next fed position is ``position``, with
        ``remaining`` tokens left in its budget (>= 1)."""
        if not self.verifying and not self.drafts:
            self.base, self.limit = position, min(self.params.num_draft, remaining)
        if self.verifying:
            return self.full_rule, self.base
        return self.draft_rule, None

    def absorb(self, result, generator: torch.Generator, truncate: Callable[[int], None]) -> list[tuple[int, int]]:
        """The step's result -> the tokens it made final, as (token, depth) (none while drafting); ``truncate``
        drops the row's positions from the given one on (rejected drafts)."""
        if not self.verifying:
            token = sample(result.logits, self.sampling, generator)
            self.drafts.append(token)
            if not self.sampling.greedy:
                self.draft_probs.append(probabilities(result.logits.cpu(), self.sampling))
            threshold = self.params.draft_threshold
            confident = threshold is None or float(confidence("max_prob", result.logits)) >= threshold
            self.verifying = len(self.drafts) >= self.limit or not confident
            return []
        tokens, accepted = _accept(self.drafts, self.draft_probs, result.final_logits, self.params, generator)
        truncate(self.base + 1 + accepted)
        self.drafts, self.draft_probs, self.verifying = [], [], False
        return [(t, self.depth if j < accepted else self.full_depth) for j, t in enumerate(tokens)]

    def feed(self, pending: int) -> list[int]:
        """The token the next step feeds: the last draft, or (starting a round) the last output token."""
        return [self.drafts[-1] if self.drafts else pending]


TokenCallback = Callable[[int, int, bool, str], Optional[bool]]


@torch.no_grad()
def generate_self_speculative(model: torch.nn.Module, prompt: Sequence[int], params: GenerationParams,
                              on_token: Optional[TokenCallback] = None) -> Generation:
    """One sequence; each output token is reported at the depth that produced it (draft exit or final).

    ``on_token(token, depth, finished, finish_reason)`` is called for each output token as soon as it is
    final (the first after prefill, then the accepted drafts and the correction of each verify step), in
    order; ``finish_reason`` is "" until the last. A callback that returns False stops the generation after
    that token (finish reason "cancelled"). Batches go through :class:`~nemo_ee.inference.scheduler.ContinuousBatcher`.
    """
    check_prompt(prompt, model)
    model.eval()
    started = time.perf_counter()
    spec = SelfSpeculation(model, params)
    generator = params.sampling.generator()
    budget = min(params.max_tokens, context_limit(model) - len(prompt))
    end_reason = "length" if budget == params.max_tokens else "context"
    engine = EarlyExitEngine(model, 1, min(context_limit(model), len(prompt) + budget + params.num_draft + 1))
    out = Generation(list(prompt), [], [])

    def emit(token: int, token_depth: int) -> bool:
        """Append one output token; True when the generation ends with it."""
        out.token_ids.append(token)
        out.exit_layers.append(token_depth)
        stop = token in params.stop_token_ids
        finished = stop or len(out.token_ids) >= budget
        if finished:
            out.finish_reason = "stop" if stop else end_reason
        wanted = on_token is None or on_token(token, token_depth, finished, out.finish_reason if finished else "") is not False
        if not (finished or wanted):
            out.finish_reason = "cancelled"
            return True
        return finished

    # Prefill with the full model: the first token is the full model's.
    first = engine.step([0], [list(prompt)], [spec.full_rule])[0]
    done = emit(sample(first.logits, spec.sampling, generator), spec.full_depth)
    while not done:
        rule, final_from = spec.plan(engine.length(0), budget - len(out.token_ids))
        result = engine.step([0], [spec.feed(out.token_ids[-1])], [rule], final_from=[final_from])[0]
        for token, depth in spec.absorb(result, generator, lambda length: engine.truncate(0, length)):
            done = emit(token, depth)
            if done:
                break
    out.seconds = time.perf_counter() - started
    return out
