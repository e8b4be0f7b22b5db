"""torch.distributed + megatron parallel_state set-up, for one process or under torchrun."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed


def initialize_distributed(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """Initialise the process group (gloo on CPU, nccl on GPU) and megatron's model-parallel groups.

    Reuses an existing process group (torchrun, Lightning); a lone process gets a world of one.
    Re-initialises parallel_state when the requested layout differs from the current one.
    """
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
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
