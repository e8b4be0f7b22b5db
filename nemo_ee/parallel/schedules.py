"""Multi-exit training on megatron's own pipeline schedules, without forking them.

The forward-step function given to ``get_forward_backward_func()`` does the exit work:
- on the last pipeline stage, its loss function returns final CE + weighted exit CEs of that stage;
- on any other stage, the stage's weighted exit losses are attached to its output tensor with
  :class:`ExitLossAutoScaler`, so megatron's ``backward(output, grad_from_next_stage)`` also
  back-propagates them (EE-LLM's auxiliary-loss trick: no extra message, no schedule change).
Per-exit loss values are recorded on the stage that owns each exit and reduced afterwards.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core import parallel_state

from nemo_ee.models.early_exit_gpt import EarlyExitOutput
from nemo_ee.models.losses import masked_sum, weighted_exit_sum


class ExitLossAutoScaler(torch.autograd.Function):
    """Identity on ``output``; in backward, adds d(``loss``) scaled like the main loss.

    Same idea as megatron's ``MTPLossAutoScaler``, with its own scale so the exit losses of a
    stage follow the main loss's normalisation (1/num_microbatches) and fp16 loss scale.
    """

    scale: torch.Tensor = torch.tensor(1.0)

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(loss) * ExitLossAutoScaler.scale.to(loss.device)


class ExitLossRecorder:
    """Accumulates, per exit, the masked CE sum and token count seen on this rank; reduces them."""

    def __init__(self, num_exits: int) -> None:
        self.num_exits = num_exits
        # slot 0: final loss; slots 1..n: exits
        self.sums = torch.zeros(num_exits + 1, dtype=torch.float64)
        self.tokens = torch.zeros(num_exits + 1, dtype=torch.float64)
        self.fill_sums = torch.zeros(num_exits, dtype=torch.float64)  # bubble-fill micro-batches, kept apart
        self.fill_tokens = torch.zeros(num_exits, dtype=torch.float64)

    def add_fill(self, index: int, loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> None:
        self.fill_sums[index] += float(loss_sum.detach())
        self.fill_tokens[index] += float(num_tokens)

    def add(self, slot: int, loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> None:
        self.sums[slot] += float(loss_sum.detach())
        self.tokens[slot] += float(num_tokens)

    def reduce(self) -> dict[str, float]:
        """Mean loss per token for the final output and every exit, over pipeline and data parallel ranks.

        Each exit lives on one pipeline stage; the others contribute zeros, so a SUM all-reduce over the
        pipeline group, then over the data-parallel group, gives the same numbers on every rank.
        """
        n = self.num_exits + 1
        packed = torch.cat([self.sums, self.tokens, self.fill_sums, self.fill_tokens])
        if torch.distributed.is_initialized():
            for group in (parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_data_parallel_group()):
                if torch.distributed.get_world_size(group) > 1:
                    torch.distributed.all_reduce(packed, group=group)
        sums, tokens = packed[:n], packed[n:2 * n]
        fill_sums, fill_tokens = packed[2 * n:3 * n - 1], packed[3 * n - 1:]
        means = (sums / tokens.clamp(min=1)).tolist()
        result = {"final": means[0], **{f"exit{i}": means[i + 1] for i in range(self.num_exits)}}
        if float(fill_tokens.sum()) > 0:
            fill_means = (fill_sums / fill_tokens.clamp(min=1)).tolist()
            result.update({f"fill_exit{i}": fill_means[i] for i in range(self.num_exits) if fill_tokens[i] > 0})
        return result


def make_forward_step(
    weights: list[float],
    recorder: ExitLossRecorder,
    config: Any,
    num_microbatches: int,
) -> Callable:
    """The ``forward_step_func`` for megatron's schedules with the exit weights of this iteration."""
    loss_scale = config.grad_scale_func(torch.ones(1)) if config.grad_scale_func is not None else torch.ones(1)
    per_token = bool(getattr(config, "calculate_per_token_loss", False))
    ExitLossAutoScaler.scale = loss_scale.detach().float().reshape(()) / (1 if per_token else num_microbatches)

    def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next(data_iterator)
        loss_mask = batch["loss_mask"]
        out: EarlyExitOutput = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        num_tokens = loss_mask.sum()
        for index, per_token_ce in out.exits.items():
            recorder.add(index + 1, masked_sum(per_token_ce, loss_mask), num_tokens)
        exit_sum = weighted_exit_sum(out.exits, weights, loss_mask)

        if not parallel_state.is_pipeline_last_stage():
            output = out.output
            if out.exits and torch.is_grad_enabled():
                attached = exit_sum if per_token else exit_sum / num_tokens.clamp(min=1)
                output = ExitLossAutoScaler.apply(output, attached)
            return output, None

        def loss_func(result: EarlyExitOutput):
            final_sum = masked_sum(result.output, loss_mask)
            recorder.add(0, final_sum, num_tokens)
            total = final_sum + exit_sum
            return total, num_tokens.to(torch.int), {"loss": torch.stack([total.detach(), num_tokens.float()])}

        return out, loss_func

    return forward_step


def run_forward_backward(
    model_chunks: list[torch.nn.Module],
    microbatches: list[dict],
    weights: list[float],
    recorder: ExitLossRecorder,
    config: Any,
    seq_length: int,
    forward_only: bool = False,
    fill_microbatches: Optional[list[dict]] = None,
) -> None:
    """One global batch through megatron's schedule; per-exit loss sums go into ``recorder``.

    ``fill_microbatches``: extra micro-batches trained on the first stage's exits inside the pipeline
    bubble (see :mod:`nemo_ee.parallel.bubble_fill`); ignored without pipeline parallelism.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_step = make_forward_step(weights, recorder, config, len(microbatches))
    if fill_microbatches and not forward_only and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        from nemo_ee.parallel.bubble_fill import pipeline_with_bubble_fill

        pipeline_with_bubble_fill(forward_step, model_chunks, microbatches, fill_microbatches, weights, recorder,
                                  ExitLossAutoScaler.scale, seq_length)
        return
    get_forward_backward_func()(
        **schedule_kwargs(forward_step, model_chunks, microbatches, seq_length), forward_only=forward_only
    )


def schedule_kwargs(forward_step: Callable, model_chunks: list, microbatches: list[dict], seq_length: int) -> dict:
    """The arguments every megatron forward-backward schedule takes, for one global batch."""
    return dict(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=model_chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
    )


def split_microbatches(batch: dict, micro_batch_size: int) -> list[dict]:
    """Split a [global_batch_per_rank, ...] batch dict into micro-batches of ``micro_batch_size``."""
    n = batch["tokens"].shape[0]
    if n % micro_batch_size:
        raise ValueError(f"batch of {n} samples is not divisible by micro_batch_size={micro_batch_size}")
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]
