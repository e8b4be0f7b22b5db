"""Filling 1F1B pipeline bubbles with exit work (EE-LLM's experimental option), without forking megatron.

In megatron's non-interleaved 1F1B schedule the first stage idles during the cool-down: each
``recv_backward`` waits for a gradient that later stages are still computing. We hand the schedule
our own ``P2PCommunicator`` whose ``recv_backward`` first runs *fill* micro-batches on the first
stage, then receives as usual. A fill micro-batch runs only the first stage's layers up to its
deepest exit and back-propagates only that stage's exit losses; it adds no point-to-point message.

Normalisation: a fill micro-batch's loss is ``sum_i w_i * CE_i / num_tokens``, scaled like a regular
micro-batch (grad scale / number of regular micro-batches), so each fill micro-batch weighs on the
first stage's exits exactly as one more regular micro-batch's exit losses would.
Fill runs only on the first stage: later stages would need the earlier stages' activations, i.e. extra
messages. With ``bubble_fill_microbatches=0`` nothing here is used and the plain schedule runs.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection

from nemo_ee.models.losses import masked_sum, weighted_exit_sum


class BubbleFillingCommunicator(P2PCommunicator):
    """megatron's P2PCommunicator; on the first stage, cool-down receives are preceded by fill work."""

    def __init__(self, pp_group: Any, config: Any, fill_step, num_fill: int, num_cooldown: int) -> None:
        super().__init__(pp_group=pp_group, config=config)
        self._fill_step = fill_step
        self._left = num_fill
        self._slots = max(num_cooldown, 1)
        self.fills_run = 0

    def recv_backward(self, tensor_shapes, is_last_stage: bool):
        if self._left > 0 and not is_last_stage:
            share = -(-self._left // self._slots)  # spread the fills over the remaining cool-down waits
            for _ in range(share):
                self._fill_step()
                self.fills_run += 1
            self._left -= share
            self._slots = max(self._slots - 1, 1)
        return super().recv_backward(tensor_shapes, is_last_stage)


def make_fill_step(model: torch.nn.Module, batches: Iterator[dict], weights: list[float], scale: torch.Tensor, recorder: Any):
    """One fill micro-batch on the first stage: forward to the deepest local exit, backward its exit losses."""
    from nemo_ee.models.early_exit_gpt import EarlyExitGPTModel

    inner = model
    while not isinstance(inner, EarlyExitGPTModel):
        inner = inner.module

    def fill_step() -> None:
        batch = next(batches)
        mask = batch["loss_mask"]
        exits = inner.forward_exits_only(batch["tokens"], batch["position_ids"], batch["labels"])
        num_tokens = mask.sum().clamp(min=1)
        for index, ce in exits.items():
            recorder.add_fill(index, masked_sum(ce, mask), mask.sum())
        loss = weighted_exit_sum(exits, weights, mask) / num_tokens
        (loss * scale).backward()

    return fill_step


def pipeline_with_bubble_fill(
    forward_step_func,
    model_chunks: list,
    microbatches: list[dict],
    fill_microbatches: list[dict],
    weights: list[float],
    recorder: Any,
    scale: torch.Tensor,
    seq_length: int,
) -> BubbleFillingCommunicator:
    """megatron's 1F1B schedule with fill work in the first stage's cool-down; returns the communicator."""
    from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_without_interleaving

    from nemo_ee.parallel.schedules import schedule_kwargs

    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_size, pp_rank = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_rank()
    num_cooldown = min(pp_size - pp_rank - 1, len(microbatches))
    first_stage = parallel_state.is_pipeline_first_stage()
    fill = make_fill_step(model_chunks[0], iter(fill_microbatches), weights, scale, recorder) if first_stage else None
    communicator = BubbleFillingCommunicator(
        pp_group, model_chunks[0].config, fill, len(fill_microbatches) if first_stage else 0, num_cooldown
    )
    forward_backward_pipelining_without_interleaving(
        **schedule_kwargs(forward_step_func, model_chunks, microbatches, seq_length),
        p2p_communicator=communicator,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    return communicator
