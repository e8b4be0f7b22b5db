"""Memory accounting of one training step on CPU (EE-Tuning vs full fine-tuning; scripts/bench_tuning.py).

No CUDA here, and tracemalloc does not see torch's allocator, so a step's memory is an explicit byte count:
resident parameters + gradients of the trainable ones + AdamW state (2 x trainable) + the tensors autograd
saves for backward (counted through ``torch.autograd.graph.saved_tensors_hooks``, by storage, parameters
excluded). Transient forward buffers freed before backward are not counted, for either kind of step.
"""
from __future__ import annotations

from typing import Iterable

import torch


class SavedTensorCounter:
    """Bytes of the tensors autograd saves for backward inside :meth:`hooks` (by storage, parameters excluded)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.param_ptrs and ptr not in self.storages:
            self.storages[ptr] = storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context in which the counted forward runs."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def param_bytes(params: Iterable[torch.Tensor]) -> int:
    """Total bytes of ``params``."""
    return sum(p.numel() * p.element_size() for p in params)


def step_memory(resident: Iterable[torch.Tensor], trainable: Iterable[torch.Tensor], saved_bytes: int) -> dict[str, int]:
    """{params, grads, adam, saved_activations} in bytes for a step with AdamW over ``trainable``."""
    trainable_bytes = param_bytes(trainable)
    return {"params": param_bytes(resident), "grads": trainable_bytes, "adam": 2 * trainable_bytes,
            "saved_activations": int(saved_bytes)}


def step_flops_per_token(num_layers: int, hidden: int, seq: int, vocab: int, exit_layers: list[int],
                         deepest_point: int) -> tuple[int, int]:
    """(EE-Tuning, full fine-tuning) FLOPs per token of one step; backward = 2 x forward.

    A layer's forward is 24h^2 + 4sh, an output projection 2hV. EE-Tuning: the backbone forward up to the
    deepest exit + the exit projections forward and backward; full: everything forward and backward.
    """
    layer = 24 * hidden * hidden + 4 * seq * hidden
    proj = 2 * hidden * vocab
    ee = deepest_point * layer + 3 * len(exit_layers) * proj
    full = 3 * (num_layers * layer + (1 + len(exit_layers)) * proj)
    return ee, full
