"""The one CUDA->CPU shim that lets megatron-core 0.16 run without a GPU.

megatron-core hard-codes CUDA in a few dozen places (``device="cuda"`` literals,
``torch.cuda.current_device()``, the CUDA RNG tracker, ``pin_memory=True``). On a
machine without CUDA we do not touch ``torch`` itself: we give the megatron modules
that need it their own ``torch`` name, a thin proxy that forwards every attribute to
the real torch except the few CUDA entry points listed below. Code outside those
megatron modules (ours, Lightning's, NeMo's, user code) sees the real torch.

``apply()`` is idempotent and does nothing when ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import importlib
import logging
import types
from typing import Any

import torch

__all__ = ["apply", "is_applied", "PATCHED_MODULES"]

# The megatron modules whose module-level ``torch`` name is replaced, and why.
PATCHED_MODULES: dict[str, str] = {
    # RNG tracker: fork/add read and write the CUDA generator -> use the CPU generator.
    "megatron.core.tensor_parallel.random": "RNG tracker uses torch.cuda rng state and manual_seed",
    # Buffers allocated with device=torch.cuda.current_device().
    "megatron.core.utils": "GlobalMemoryBuffer allocates on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.layers": "SP all-gather buffers on current_device()",
    "megatron.core.tensor_parallel.mappings": "gather/scatter buffers on current_device()",
    "megatron.core.tensor_parallel.utils": "split/gather buffers on current_device()",
    "megatron.core.tensor_parallel.data": "broadcast_data uses device='cuda' and .cuda()",
    "megatron.core.transformer.attention": "KV buffers on current_device()",
    "megatron.core.transformer.dot_product_attention": "score buffers on current_device()",
    "megatron.core.transformer.transformer_layer": "inference offsets moved to current_device()",
    "megatron.core.transformer.module": "fp16 wrapper allocates on current_device()",
    "megatron.core.transformer.utils": "causal masks built with device='cuda'",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq on current_device()",
    "megatron.core.models.common.embeddings.rope_utils": "pin_memory=True on CP index tensors",
    # Pipeline schedules and point-to-point communication.
    "megatron.core.pipeline_parallel.schedules": "num-tokens counters with device='cuda'",
    "megatron.core.pipeline_parallel.p2p_communication": "shape/recv buffers on current_device(), torch.cuda.synchronize()",
    # Data-parallel grads, optimizer, clipping.
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers on current_device(), warm-up tensor on 'cuda'",
    "megatron.core.distributed.distributed_data_parallel": "communication stream, synchronize()",
    "megatron.core.distributed.finalize_model_grads": "num-tokens all-reduce on current_device()",
    "megatron.core.optimizer.optimizer": "found_inf / scale tensors with device='cuda'",
    "megatron.core.optimizer.clip_grads": "grad-norm tensors with device='cuda'",
    "megatron.core.parallel_state": "torch.cuda.synchronize() in barriers",
    "megatron.core.rerun_state_machine": "validation tensors with device='cuda', cuda rng state",
}

_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "empty_strided", "as_tensor",
)

_applied = False


def _is_cuda(device: Any) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_kwargs(kwargs: dict) -> dict:
    if _is_cuda(kwargs.get("device")):
        kwargs["device"] = "cpu"
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False  # pinning needs a CUDA driver
    return kwargs


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        return fn(*args, **_cpu_kwargs(kwargs))

    factory.__name__ = fn.__name__
    return factory


class _DeviceMeta(type):
    """``torch.device`` stand-in: ``torch.device("cuda", i)`` -> cpu; isinstance still works."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, torch.device)

    def __call__(cls, *args: Any, **kwargs: Any) -> torch.device:
        if args and _is_cuda(args[0]) and not isinstance(args[0], int):
            return torch.device("cpu")
        return torch.device(*args, **kwargs)


class _Device(metaclass=_DeviceMeta):
    pass


class _CudaOnCpu:
    """``torch.cuda`` stand-in: the current device is the CPU and its RNG is the CPU's."""

    def __getattr__(self, name: str) -> Any:  # everything else: the real torch.cuda
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(*_args: Any, **_kwargs: Any) -> None:
        return None  # CPU ops are synchronous

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @property
    def random(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(get_rng_state=self.get_rng_state, set_rng_state=self.set_rng_state)


class _TorchOnCpu(types.ModuleType):
    """A ``torch`` seen through the shim: CUDA devices and pinning map to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        self.device = _Device
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _rng_get(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _rng_set(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


class _ExpectedRngWarning(logging.Filter):
    """With the shim the tracker's generator *is* the CPU one, so its 'CPU RNG changed' warning is moot."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _clip_grad_by_total_norm_fp32(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """CPU twin of megatron's clip: its original asserts ``grad.type() == 'torch.cuda.FloatTensor'``."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        if g.dtype != torch.float32 and not use_decoupled_grad:
            raise TypeError(f"gradient clipping expects fp32 grads, got {g.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_([g.detach() for g in grads], clip_coeff)


def _tensor_cuda_is_identity(method):
    """Run a megatron method whose body calls ``tensor.cuda()`` with that call returning the CPU tensor.

    ``LanguageModule.setup_embeddings_and_output_layer`` moves the shared embedding with
    ``weight.data.cuda()`` before all-reducing it across the first and last pipeline stages. A tensor
    method cannot be redirected through a module's ``torch`` name, so ``Tensor.cuda`` is swapped only
    for the duration of that one call.
    """
    import functools

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    wrapper.__nemo_ee_cpu_shim__ = True
    return wrapper


def is_applied() -> bool:
    """True once the shim is active in this process."""
    return _applied


def apply() -> bool:
    """Activate the shim if CUDA is absent; returns whether it is active."""
    global _applied
    if _applied or torch.cuda.is_available():
        return _applied
    proxy = _TorchOnCpu()
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    # The tracker saves/restores generator states through these two helpers.
    random._get_cuda_rng_state = _rng_get
    random._set_cuda_rng_state = _rng_set
    logging.getLogger(random.__name__).addFilter(_ExpectedRngWarning())
    # Gradient clipping asserts a CUDA tensor type; the optimizer imported it by name.
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        importlib.import_module(name).clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    language_module = importlib.import_module("megatron.core.models.common.language_module.language_module")
    lm = language_module.LanguageModule
    lm.setup_embeddings_and_output_layer = _tensor_cuda_is_identity(lm.setup_embeddings_and_output_layer)
    _applied = True
    return True
