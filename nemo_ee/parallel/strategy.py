"""The Lightning strategy for multi-process (data / tensor / pipeline parallel) training under torchrun.

:class:`MegatronStrategy` is a ``DDPStrategy`` that lets megatron-core do the parallel work:

- the processes come from torchrun (``torchrun --nproc_per_node N scripts/pretrain.py ...``); the
  process group is gloo on CPU, nccl on GPU, and megatron's ``parallel_state`` is initialised with the
  model's tensor / pipeline sizes through :func:`nemo_ee.parallel.initialize.initialize_distributed`;
- the LightningModule is *not* wrapped in torch DDP: ``configure_optimizers`` wraps the backbone in
  megatron's DDP, which reduces the gradients over the data-parallel group;
- the module states are *not* broadcast from rank 0 (pipeline stages and tensor shards differ);
- checkpoints are directories (NeMo's convention for distributed checkpoints: ``x.ckpt`` -> ``x/``)::

      x/model/        nemo_ee.checkpoint.dist.save_model: megatron dist_checkpointing of the model's
                      sharded_state_dict and the optimizer's (Adam moments), every rank its shards
      x/trainer.ckpt  Lightning's own state (loops, global step, callbacks, LR scheduler), rank 0 only,
                      loaded weights_only (SafeTorchCheckpointIO)

  ``x/model`` holds global tensors (resharded on load), so a run can resume with another TP/PP/DP
  layout, and scripts/reshard.py reads it. exp_manager's resume finds the ``*last`` directories.

``trainer.devices`` vs torchrun: torchrun owns the process count. :func:`configure_trainer_settings`
sets ``devices = LOCAL_WORLD_SIZE`` (``--nproc_per_node``) and ``num_nodes = WORLD_SIZE / LOCAL_WORLD_SIZE``
when launched by torchrun; a recipe value other than 1 / "auto" that disagrees is an error (a recipe
written for 8 GPUs launched on 4 would otherwise silently train another layout). Several devices
without torchrun are refused: the model builds its parallel state before Lightning could spawn.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from nemo_ee.parallel.initialize import initialize_distributed

MODEL_DIR = "model"
TRAINER_FILE = "trainer.ckpt"
SCHEDULER_KEY = "megatron_lr_scheduler"

# Every logged value is already all-reduced over the pipeline and data-parallel groups
# (ExitLossRecorder.reduce), so Lightning's advice to sync epoch-level logs does not apply.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level.*")


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_WORLD_SIZE" in os.environ and "WORLD_SIZE" in os.environ


def configure_trainer_settings(settings: dict, model_cfg: Any = None) -> dict:
    """Trainer kwargs for this launch: devices/num_nodes from torchrun, MegatronStrategy for several ranks.

    A single process (no torchrun, or torchrun with one process) keeps the settings as they are.
    """
    settings = dict(settings)
    if launched_by_torchrun():
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
        nodes = max(1, world // local)
        for key, value in (("devices", local), ("num_nodes", nodes)):
            given = settings.get(key, 1)
            if given not in (1, "1", "auto", None, -1, value):
                raise ValueError(
                    f"trainer.{key}={given} does not match the torchrun launch (WORLD_SIZE={world}, "
                    f"--nproc_per_node={local}): set trainer.{key}={value} or leave it at 1"
                )
            settings[key] = value
    else:
        devices = settings.get("devices", 1)
        if isinstance(devices, (list, tuple)) or (devices not in (1, "1", "auto", None) and int(devices) > 1):
            raise ValueError(
                f"trainer.devices={devices} needs one process per device: launch with "
                f"`torchrun --nproc_per_node {devices} scripts/pretrain.py ...`"
            )
        settings["devices"] = 1
    world = int(settings["devices"]) * int(settings.get("num_nodes", 1))
    if world > 1 and settings.get("strategy") in (None, "auto"):
        tp = pp = 1
        seed = 1234
        if model_cfg is not None:
            tp = int(model_cfg.arch.get("tensor_model_parallel_size", 1))
            pp = int(model_cfg.arch.get("pipeline_model_parallel_size", 1))
            seed = int(model_cfg.get("seed", seed))
        settings["strategy"] = MegatronStrategy(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=seed
        )
    return settings


def exp_manager_settings(exp_cfg: Any, model_cfg: Any) -> Any:
    """exp_manager's config for this layout: no .nemo export when the weights are split over ranks.

    A .nemo holds one whole model, which no rank has under tensor / pipeline parallelism; the
    distributed checkpoint (``<ckpt>/model``) is the artefact then (scripts/reshard.py converts it).
    """
    if exp_cfg is None or model_cfg is None:
        return exp_cfg
    tp = int(model_cfg.arch.get("tensor_model_parallel_size", 1))
    pp = int(model_cfg.arch.get("pipeline_model_parallel_size", 1))
    params = exp_cfg.get("checkpoint_callback_params")
    if tp * pp == 1 or params is None:
        return exp_cfg
    from omegaconf import OmegaConf, open_dict

    exp_cfg = OmegaConf.create(OmegaConf.to_container(exp_cfg, resolve=True))
    if exp_cfg.checkpoint_callback_params.get("save_nemo_on_train_end") or exp_cfg.checkpoint_callback_params.get(
        "always_save_nemo"
    ):
        from nemo.utils import logging

        logging.warning(f"tensor x pipeline parallel = {tp} x {pp}: no .nemo export (no rank holds the whole "
                        "model); the distributed checkpoint <ckpt>/model is the trained model")
    with open_dict(exp_cfg):
        exp_cfg.checkpoint_callback_params.save_nemo_on_train_end = False
        exp_cfg.checkpoint_callback_params.always_save_nemo = False
    return exp_cfg


def checkpoint_dir(path: Union[str, Path]) -> Path:
    """The directory of a distributed checkpoint: ``x.ckpt`` -> ``x`` (NeMo's ckpt_to_dir), a directory as is."""
    path = Path(path)
    return path.with_name(path.stem) if path.suffix == ".ckpt" else path


class MegatronStrategy(DDPStrategy):
    """DDPStrategy without torch DDP: megatron parallel_state, megatron DDP, dist_checkpointing checkpoints."""

    strategy_name = "nemo_ee_megatron"

    def __init__(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        seed: int = 1234,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tensor_model_parallel_size = tensor_model_parallel_size
        self.pipeline_model_parallel_size = pipeline_model_parallel_size
        self.seed = seed
        self._resume_dir: Optional[Path] = None

    # ------------------------------------------------------------------ set-up
    def _layout(self) -> tuple[int, int, int]:
        module = self.lightning_module
        ee = getattr(module, "ee_config", None)
        if ee is not None:
            return ee.tensor_model_parallel_size, ee.pipeline_model_parallel_size, int(module.cfg.seed)
        return self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.seed

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or ("nccl" if torch.cuda.is_available() else "gloo")

    def setup_distributed(self) -> None:
        """torchrun's process group (reused when the model created it) and megatron's parallel groups."""
        super().setup_distributed()
        from megatron.core import parallel_state

        tp, pp, seed = self._layout()
        ready = (
            parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        )
        if not ready:  # the model normally did this already; re-seeding then would change nothing useful
            ee = getattr(self.lightning_module, "ee_config", None)
            initialize_distributed(tp, pp, seed, embedding_stages=ee.embedding_stages if ee is not None else None)

    def configure_ddp(self) -> None:
        """No torch DDP: the model's configure_optimizers wraps the backbone in megatron's DDP."""

    def setup(self, trainer: Any) -> None:
        """DDPStrategy.setup minus the torch DDP wrapper and the broadcast of rank 0's weights."""
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        # No _sync_module_states: ranks hold different pipeline stages / tensor shards.
        self.setup_precision_plugin()  # megatron's optimizer state already lives with its parameters

    # ------------------------------------------------------------------ checkpoints
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load model and optimizer shards once both exist

    def lightning_module_state_dict(self) -> dict:
        return {}  # the weights go to <ckpt>/model as a distributed checkpoint

    def optimizer_state(self, optimizer: Any) -> dict:
        return {}  # the optimizer state goes to <ckpt>/model too, sharded like the weights

    def _adapter(self):
        from nemo_ee.parallel.optimizer import MegatronOptimizerAdapter

        for opt in self.optimizers:
            opt = getattr(opt, "_optimizer", opt)
            if isinstance(opt, MegatronOptimizerAdapter):
                return opt
        return None

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Every rank writes its shards of model and optimizer; rank 0 writes the trainer state."""
        from nemo_ee.checkpoint.dist import save_model

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options (async saves are not supported)")
        directory = checkpoint_dir(filepath)
        adapter = self._adapter()
        save_model(self.lightning_module.model, directory / MODEL_DIR, optimizer=adapter)  # collective, atomic
        if self.is_global_zero:
            checkpoint = dict(checkpoint, state_dict={}, optimizer_states=[])
            if adapter is not None:
                checkpoint[SCHEDULER_KEY] = adapter.scheduler.state_dict()
            self.checkpoint_io.save_checkpoint(checkpoint, directory / TRAINER_FILE)
        self.barrier("MegatronStrategy.save_checkpoint")

    def load_checkpoint(self, checkpoint_path: Any) -> dict:
        """The trainer state; the model and optimizer shards are read in load_model_state_dict."""
        directory = checkpoint_dir(checkpoint_path)
        if not (directory / TRAINER_FILE).is_file():
            if Path(checkpoint_path).is_file():
                raise ValueError(
                    f"{checkpoint_path} is a single-process checkpoint file; a {type(self).__name__} run resumes "
                    f"from a distributed checkpoint directory (<name>/{MODEL_DIR}/, <name>/{TRAINER_FILE})"
                )
            raise FileNotFoundError(f"no distributed checkpoint at {directory} (missing {TRAINER_FILE})")
        self._resume_dir = directory
        return self.checkpoint_io.load_checkpoint(directory / TRAINER_FILE)

    def load_model_state_dict(self, checkpoint: dict, strict: bool = True) -> None:
        """Model shards, and when fitting the optimizer's (both exist: restore_checkpoint_after_setup)."""
        from nemo_ee.checkpoint.dist import load_model

        if self._resume_dir is None:
            raise RuntimeError("load_model_state_dict called before load_checkpoint")
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        adapter = self._adapter() if fitting else None
        load_model(self.lightning_module.model, self._resume_dir / MODEL_DIR, optimizer=adapter, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: dict) -> None:
        """The optimizer shards came with the model (load_model_state_dict); here the LR schedule."""
        adapter = self._adapter()
        if adapter is not None and SCHEDULER_KEY in checkpoint:
            adapter.scheduler.load_state_dict(checkpoint[SCHEDULER_KEY])

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            directory = checkpoint_dir(filepath)
            if directory.is_dir():
                shutil.rmtree(directory)
            elif Path(filepath).is_file():
                os.remove(filepath)
