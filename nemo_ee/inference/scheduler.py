"""In-flight (continuous) batching over the early-exit engine.

Requests join the running batch at token boundaries and leave when they finish; each keeps its own
exit rule, sampling settings, seed and exit decisions. A new request's prefill shares the step with
the other rows' one-token decodes. Rows are the engine's cache rows, reused after a request ends.
Self-speculative requests share the batch too: in each step such a row either drafts one token (out at
its draft exit) or verifies its drafts (full depth, final logits of every drafted position), and a
verify step makes several of its tokens final at once (:class:`~nemo_ee.inference.speculative.SelfSpeculation`).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Optional, Sequence

import torch

from nemo_ee.inference.engine import EarlyExitEngine
from nemo_ee.inference.generate import Generation, GenerationParams, check_prompt, context_limit
from nemo_ee.inference.sampling import sample
from nemo_ee.inference.speculative import SelfSpeculation


@dataclasses.dataclass
class TokenEvent:
    """One generated token of one request (what a streaming server sends)."""

    request_id: int
    token: int
    depth: int
    finished: bool
    finish_reason: Optional[str]


class _Request:
    def __init__(self, rid: int, prompt: Sequence[int], params: GenerationParams, model) -> None:
        self.rid, self.params = rid, params
        self.spec = SelfSpeculation(model, params) if params.decode_mode == "self_speculative" else None
        self.rule = params.rule(model.ee_config.exit_layer_nums)
        self.sampling = params.sampling
        self.generator = self.sampling.generator()
        self.budget = min(int(params.max_tokens), context_limit(model) - len(prompt))
        if self.spec is not None:
            self.rule = self.spec.full_rule  # the prefill: the first token is the full model's
        self.out = Generation(list(prompt), [], [])
        self.pending = list(prompt)  # tokens to feed at the next step
        self.prefilled = False
        self.row: Optional[int] = None
        self.started = time.perf_counter()
        self.done = False

    def accept(self, token: int, depth: int) -> None:
        self.out.token_ids.append(token)
        self.out.exit_layers.append(depth)
        self.pending = [token]
        if token in self.params.stop_token_ids:
            self._finish("stop")
        elif len(self.out.token_ids) >= self.budget:
            self._finish("length" if self.budget == self.params.max_tokens else "context")

    def _finish(self, reason: str) -> None:
        self.done = True
        self.out.finish_reason = reason
        self.out.seconds = time.perf_counter() - self.started


class ContinuousBatcher:
    """Up to ``max_batch`` concurrent requests on one model; :meth:`step` advances each by one token."""

    def __init__(self, model: torch.nn.Module, max_batch: int, capacity: Optional[int] = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        model.eval()
        self.model = model
        self.engine = EarlyExitEngine(model, max_batch, capacity or context_limit(model))
        self.free = list(range(max_batch))
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: dict[int, _Request] = {}
        self.finished: dict[int, _Request] = {}
        self._ids = itertools.count()

    def submit(self, prompt: Sequence[int], params: GenerationParams) -> int:
        """Queue a request (validated now, before any work); returns its id."""
        check_prompt(prompt, self.model)
        if len(prompt) + 1 > self.engine.capacity:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this batcher's cache holds {self.engine.capacity}")
        request = _Request(next(self._ids), prompt, params, self.model)
        request.budget = min(request.budget, self.engine.capacity - len(prompt))
        self.waiting.append(request)
        return request.rid

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def result(self, rid: int) -> Generation:
        """The finished generation of request ``rid`` (removed from the batcher)."""
        return self.finished.pop(rid).out

    def cancel(self, rid: int) -> None:
        """Drop a request (e.g. its client went away); its row is freed."""
        self.waiting = collections.deque(r for r in self.waiting if r.rid != rid)
        request = self.running.pop(rid, None)
        if request is not None:
            self.free.append(request.row)

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests into free rows, then one engine step over every running row."""
        while self.waiting and self.free:
            request = self.waiting.popleft()
            request.row = self.free.pop(0)
            self.engine.reset(request.row)
            self.running[request.rid] = request
        if not self.running:
            return []
        active = list(self.running.values())
        feeds, rules, final_from = [], [], []
        for q in active:
            if q.spec is not None and q.prefilled:
                rule, start = q.spec.plan(self.engine.length(q.row), q.budget - len(q.out.token_ids))
                feeds.append(q.spec.feed(q.pending[-1]))
                rules.append(rule)
                final_from.append(start)
            else:
                feeds.append(q.pending)
                rules.append(q.rule)
                final_from.append(None)
        results = self.engine.step([q.row for q in active], feeds, rules, final_from=final_from)
        events = []
        for q in active:
            res = results[q.row]
            if q.spec is not None and q.prefilled:
                made = q.spec.absorb(res, q.generator, lambda length, row=q.row: self.engine.truncate(row, length))
            else:
                made = [(sample(res.logits, q.sampling, q.generator), res.depth)]
            q.prefilled = True
            for token, depth in made:
                q.accept(token, depth)
                events.append(TokenEvent(q.rid, token, depth, q.done, q.out.finish_reason if q.done else None))
                if q.done:
                    break
            if q.done:
                del self.running[q.rid]
                self.free.append(q.row)
                self.finished[q.rid] = q
        return events
