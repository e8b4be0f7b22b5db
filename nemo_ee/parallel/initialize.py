"""torch.distributed + megatron parallel_state set-up, for one process or under torchrun."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed


_layout: Optional[tuple] = None


def initialize_distributed(
    tp: int = 1, pp: int = 1, seed: int = 1234, embedding_stages: Optional[Sequence[int]] = None
) -> None:
    """Initialise the process group (gloo on CPU, nccl on GPU) and megatron's model-parallel groups.

    Reuses an existing process group (torchrun, Lightning); a lone process gets a world of one.
    Re-initialises parallel_state when the requested layout differs from the current one.
    ``embedding_stages``: pipeline stages that hold a copy of the word embedding (megatron's
    embedding group); default first and last, plus any stage with tied exits
    (``EarlyExitConfig.embedding_stages``).
    """
    global _layout
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun / SLURM-style launch: rendezvous from the environment
            dist.init_process_group(backend=backend)
        else:  # a lone process: an in-memory store, no port to race for
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor ({tp}) x pipeline ({pp}) parallel size")
    stages = sorted(set(embedding_stages or ()) | ({0, pp - 1}))
    for stage in stages:
        if not 0 <= stage < pp:
            raise ValueError(f"embedding stage {stage} is outside 0..{pp - 1}")
    layout = (tp, pp, tuple(stages))
    if parallel_state.model_parallel_is_initialized() and layout != _layout:
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            get_embedding_ranks=lambda pp_ranks, *_: sorted({pp_ranks[s] for s in stages}),
        )
        _layout = layout
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
