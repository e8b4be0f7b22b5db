"""A least-squares start for EE-Tuning: each exit's output layer fitted in closed form (a tuned-lens-style init).

Copying the final norm and output layer to an intermediate layer (EE-Tuning's copy init) reads that layer's
hidden state as if it were the last one; on a deep, narrow model it is not (SmolLM2-135M: 2-24% greedy
agreement with the final layer at depths 8/15/23 of 30). The final logits are ``W @ y`` with ``y`` the final
normed hidden state; the exit's are ``W_e @ x`` with ``x`` what the exit's output layer reads (its norm,
and its MLP when it has one, applied to the layer's output). Fitting ``y ~ A x`` by ridge-regularised least
squares over a few thousand tokens of the frozen model and setting ``W_e = W @ A`` gives the exit the final
layer's own vocabulary projection of its best linear estimate of the final hidden state: one forward pass
and a hidden x hidden solve per exit, seconds instead of minutes of gradient steps. Training continues from
there (KL or CE).
"""
from __future__ import annotations

from typing import Iterable

import torch


@torch.no_grad()
def fit_exit_output_layers(model: torch.nn.Module, batches: Iterable[dict], ridge: float = 1e-2) -> dict[int, dict]:
    """Set each exit's output weight to ``W_final @ A_e``, ``A_e`` the ridge least-squares map from the exit's
    output-layer input to the final output layer's input over ``batches`` (tokens / position_ids).

    Needs the whole model on one rank (TP=PP=1) and untied exits. Returns {exit index: {"residual": relative
    squared error of the fit, "identity_residual": that of the copy init (A = I), "tokens": n}}."""
    ee = model.ee_config
    if ee.tensor_model_parallel_size * ee.pipeline_model_parallel_size != 1:
        raise ValueError("the least-squares exit init needs TP=PP=1 (the whole model on one rank)")
    if ee.tie_exit_output:
        raise ValueError("the least-squares exit init sets the exits' own output weights; tied exits "
                         "(tie_exit_output=True) have none")
    if not (model.pre_process and model.post_process):
        raise ValueError("the least-squares exit init needs the final output layer (a whole model, not a truncated one)")
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or ridge < 0:
        raise ValueError(f"ridge={ridge!r} must be a number >= 0")
    captured: dict[object, list[torch.Tensor]] = {}

    def keep(key: object):
        def hook(_module, inputs, _output):
            x = inputs[0].detach()
            captured.setdefault(key, []).append(x.reshape(-1, x.shape[-1]).double())
        return hook

    handles = [model.output_layer.register_forward_hook(keep("final"))]
    handles += [head.output_layer.register_forward_hook(keep(int(i))) for i, head in model.exits.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch["tokens"], batch["position_ids"], None)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if "final" not in captured:
        raise ValueError("no batches: the least-squares exit init needs some tokens")
    y = torch.cat(captured.pop("final"))
    final = model.output_layer.weight  # None when tied: megatron then projects with the word embedding
    weight = (final if final is not None else model.shared_embedding_or_output_weight()).detach().double()
    stats = {}
    for index, parts in sorted(captured.items()):
        x = torch.cat(parts)
        n, h = x.shape
        gram = x.T @ x / n + float(ridge) * x.pow(2).mean() * torch.eye(h, dtype=x.dtype)
        a_t = torch.linalg.solve(gram, x.T @ y / n)  # y ~ x @ a_t
        scale = y.pow(2).mean()
        stats[index] = {"residual": float((x @ a_t - y).pow(2).mean() / scale),
                        "identity_residual": float((x - y).pow(2).mean() / scale), "tokens": n}
        out = model.exits[str(index)].output_layer.weight
        out.copy_((weight @ a_t.T).to(out.dtype))
    return stats
