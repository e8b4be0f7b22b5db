"""The naive reference decoder: no cache; every step runs megatron's full forward on the whole sequence.

It applies the same exit rule to the last position (exits in depth order, the first that fires wins)
and samples with the same sampler and seed. The cached decoders must match it token for token and
exit for exit; being slow and obviously right is its whole job.
"""
from __future__ import annotations

from typing import Sequence

import torch

from nemo_ee.inference.generate import Generation, GenerationParams, check_prompt, context_limit
from nemo_ee.inference.sampling import sample


@torch.no_grad()
def reference_generate(model: torch.nn.Module, prompt: Sequence[int], params: GenerationParams) -> Generation:
    """Generate one sequence by full recomputation at every step (TP=PP=1)."""
    check_prompt(prompt, model)
    model.eval()
    ee = model.ee_config
    rule = params.rule(ee.exit_layer_nums)
    sampling, generator = params.sampling, params.sampling.generator()
    order = sorted(model.local_exit_indices, key=lambda i: (model.exits[str(i)].point, i))
    budget = min(params.max_tokens, context_limit(model) - len(prompt))
    seq, out = list(prompt), Generation(list(prompt), [], [])
    while len(out.token_ids) < budget:
        ids = torch.tensor([seq])
        result = model(ids, torch.arange(len(seq)).unsqueeze(0), None)
        logits, depth = result.output[0, -1], ee.num_layers
        for index in order:
            exit_logits = result.exits[index][0, -1].float()
            if rule.vocab is not None:  # the exits score only these ids
                kept = torch.full_like(exit_logits, -float("inf"))
                kept[list(rule.vocab)] = exit_logits[list(rule.vocab)]
                exit_logits = kept
            if rule.uses(index) and bool(rule.fires(exit_logits, index)):
                logits, depth = exit_logits, model.exits[str(index)].point
                break
        token = sample(logits.float(), sampling, generator)
        seq.append(token)
        out.token_ids.append(token)
        out.exit_layers.append(depth)
        if token in params.stop_token_ids:
            out.finish_reason = "stop"
            return out
    out.finish_reason = "length" if budget == params.max_tokens else "context"
    return out
