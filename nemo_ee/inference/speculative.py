"""Lossless self-speculative decoding (LayerSkip-style) with the model's own early exit as the draft.

Draft: k tokens, each leaving at the draft exit (layers up to it, plus its head). Verify: the last
draft goes through the full model, and in the same forward each deeper layer first processes the k
drafted positions it is missing; the layers below the exit reuse the KV the drafts already wrote.
The final logits of those k+1 positions decide: greedy keeps the drafts that equal the full model's
argmax and appends its correction (so the output is the full model's greedy output); with sampling,
speculative rejection sampling keeps the full model's distribution. Rejected positions are truncated.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from nemo_ee.inference.engine import EarlyExitEngine
from nemo_ee.inference.generate import Generation, GenerationParams, check_prompt, context_limit
from nemo_ee.inference.policies import ExitRule
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


TokenCallback = Callable[[int, int, bool, str], Optional[bool]]


@torch.no_grad()
def generate_self_speculative(model: torch.nn.Module, prompt: Sequence[int], params: GenerationParams,
                              on_token: Optional[TokenCallback] = None) -> Generation:
    """One sequence; each output token is reported at the depth that produced it (draft exit or final).

    ``on_token(token, depth, finished, finish_reason)`` is called for each output token as soon as it is
    final (the first after prefill, then the accepted drafts and the correction of each verify step), in
    order; ``finish_reason`` is "" until the last. A callback that returns False stops the generation after
    that token (finish reason "cancelled").
    """
    check_prompt(prompt, model)
    model.eval()
    started = time.perf_counter()
    index = draft_exit_index(model, params.draft_exit)
    depth = model.exits[str(index)].point
    full_depth = model.ee_config.num_layers
    draft_rule, full_rule = ExitRule(forced=index), ExitRule.full()
    sampling, generator = params.sampling, params.sampling.generator()
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
    first = engine.step([0], [list(prompt)], [full_rule])[0]
    pending = sample(first.logits, sampling, generator)
    done = emit(pending, full_depth)
    while not done:
        k = min(params.num_draft, budget - len(out.token_ids))
        base = engine.length(0)  # position of ``pending``
        drafts, draft_probs, feed = [], [], pending
        for _ in range(k):
            res = engine.step([0], [[feed]], [draft_rule])[0]
            feed = sample(res.logits, sampling, generator)
            drafts.append(feed)
            draft_probs.append(probabilities(res.logits.cpu(), sampling))
        verify = engine.step([0], [[feed]], [full_rule], final_from=[base])[0]
        tokens, accepted = _accept(drafts, draft_probs, verify.final_logits, params, generator)
        engine.truncate(0, base + 1 + accepted)
        for j, token in enumerate(tokens):
            done = emit(token, depth if j < accepted else full_depth)
            if done:
                break
        pending = out.token_ids[-1]
    out.seconds = time.perf_counter() - started
    return out
