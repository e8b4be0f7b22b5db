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
from typing import Sequence

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
    target = probabilities(final_logits, sampling)
    for n, (token, q) in enumerate(zip(draft_tokens, draft_probs)):
        p = target[n]
        if float(torch.rand((), generator=generator)) * float(q[token]) > float(p[token]):
            residual = (p - q).clamp_min(0.0)
            residual = residual / residual.sum() if float(residual.sum()) > 0 else p
            return draft_tokens[:n] + [int(torch.multinomial(residual, 1, generator=generator))], n
    return draft_tokens + [int(torch.multinomial(target[len(draft_tokens)], 1, generator=generator))], len(draft_tokens)


@torch.no_grad()
def generate_self_speculative(model: torch.nn.Module, prompt: Sequence[int], params: GenerationParams) -> Generation:
    """One sequence; each output token is reported at the depth that produced it (draft exit or final)."""
    check_prompt(prompt, model)
    model.eval()
    started = time.perf_counter()
    index = draft_exit_index(model, params.draft_exit)
    depth = model.exits[str(index)].point
    draft_rule, full_rule = ExitRule(forced=index), ExitRule.full()
    sampling, generator = params.sampling, params.sampling.generator()
    budget = min(params.max_tokens, context_limit(model) - len(prompt))
    engine = EarlyExitEngine(model, 1, min(context_limit(model), len(prompt) + budget + params.num_draft + 1))
    out = Generation(list(prompt), [], [])
    # Prefill with the full model: the first token is the full model's.
    first = engine.step([0], [list(prompt)], [full_rule])[0]
    pending = sample(first.logits, sampling, generator)
    out.token_ids.append(pending)
    out.exit_layers.append(model.ee_config.num_layers)
    while len(out.token_ids) < budget and pending not in params.stop_token_ids:
        k = min(params.num_draft, budget - len(out.token_ids))
        base = engine.length(0)  # position of ``pending``
        drafts, draft_probs, feed = [], [], pending
        for _ in range(k):
            res = engine.step([0], [[feed]], [draft_rule])[0]
            feed = sample(res.logits, sampling, generator)
            drafts.append(feed)
            draft_probs.append(probabilities(res.logits, sampling))
        verify = engine.step([0], [[feed]], [full_rule], final_from=[base])[0]
        tokens, accepted = _accept(drafts, draft_probs, verify.final_logits, params, generator)
        engine.truncate(0, base + 1 + accepted)
        for j, token in enumerate(tokens):
            out.token_ids.append(token)
            out.exit_layers.append(depth if j < accepted else model.ee_config.num_layers)
            if token in params.stop_token_ids or len(out.token_ids) >= budget:
                break
        pending = out.token_ids[-1]
    out.token_ids, out.exit_layers = out.token_ids[:budget], out.exit_layers[:budget]
    stopped = out.token_ids[-1] in params.stop_token_ids
    if stopped:
        cut = next(i for i, t in enumerate(out.token_ids) if t in params.stop_token_ids) + 1
        out.token_ids, out.exit_layers = out.token_ids[:cut], out.exit_layers[:cut]
    out.finish_reason = "stop" if stopped else ("length" if budget == params.max_tokens else "context")
    out.seconds = time.perf_counter() - started
    return out
