"""megatron-core's optimizer and LR scheduler, presented to Lightning as a torch optimizer.

Lightning counts steps, saves and restores optimizer state only for ``torch.optim.Optimizer``s.
megatron's ``MegatronOptimizer`` (grad-norm across TP/PP, clipping, loss scaling, distributed
optimizer) is not one, so :class:`MegatronOptimizerAdapter` forwards the few calls Lightning makes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass
class OptimSettings:
    """The ``optim`` section of a recipe."""

    lr: float = 1e-3  # peak learning rate (Adam)
    min_lr: float = 1e-4  # learning rate at the end of the decay
    warmup_steps: int = 0  # linear warm-up steps
    decay_steps: Optional[int] = None  # None = the trainer's max_steps
    decay_style: str = "cosine"  # constant | linear | cosine | inverse-square-root
    weight_decay: float = 0.01  # decoupled weight decay
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0 disables)

    def __post_init__(self) -> None:
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.lr={self.lr} must be > 0 and optim.min_lr={self.min_lr} within [0, lr]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.decay_style not in ("constant", "linear", "cosine", "inverse-square-root"):
            raise ValueError(
                f"optim.decay_style={self.decay_style!r} is not one of "
                "['constant', 'linear', 'cosine', 'inverse-square-root']"
            )
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")


class MegatronOptimizerAdapter(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` face on a megatron optimizer and its LR scheduler."""

    def __init__(self, optimizer: Any, scheduler: OptimizerParamScheduler) -> None:
        # Deliberately no super().__init__: the parameter groups and state are megatron's.
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.defaults: dict = {}
        self.last_grad_norm: Optional[float] = None
        self.last_step_ok = True

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure: Optional[Callable] = None) -> None:
        if closure is not None:
            closure()
        ok, grad_norm, _ = self.optimizer.step()
        self.last_step_ok, self.last_grad_norm = bool(ok), grad_norm
        if ok:
            self.scheduler.step(increment=1)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.scheduler.load_state_dict(state_dict["scheduler"])

    def __repr__(self) -> str:
        return f"MegatronOptimizerAdapter({type(self.optimizer).__name__})"


def wrap_ddp(module: torch.nn.Module) -> DistributedDataParallel:
    """megatron's DDP: contiguous grad buffers, all-reduce over the data-parallel group."""
    config = module.config
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    return DistributedDataParallel(config, ddp_config, module)


def build_optimizer(ddp_model: DistributedDataParallel, settings: OptimSettings, max_steps: int) -> MegatronOptimizerAdapter:
    """Adam + OptimizerParamScheduler (warm-up then decay to min_lr), as megatron-core builds them."""
    config = ddp_model.config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        fp16=config.fp16,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    decay = settings.decay_steps or max(max_steps, settings.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if settings.warmup_steps else settings.lr,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=settings.warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=settings.decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )
    return MegatronOptimizerAdapter(optimizer, scheduler)
