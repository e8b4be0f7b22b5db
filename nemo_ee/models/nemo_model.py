"""The NeMo ModelPT for early-exit GPTs: Lightning training via megatron schedules, .nemo save/restore.

Recipe sections (see conf/ee_gpt_tiny.yaml): ``arch`` (EarlyExitConfig), ``tokenizer``, ``data``,
``optim`` (OptimSettings), plus ``seed``, ``micro_batch_size`` and ``global_batch_size``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Trainer
from nemo.core.classes import ModelPT
from nemo.core.classes import common as _nemo_common
from nemo.core.connectors.save_restore_connector import SaveRestoreConnector
from nemo.utils import logging
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from nemo_ee.config import EarlyExitConfig
from nemo_ee.data import CorpusSpec, build_datasets, load_tokenizer, train_tokenizer
from nemo_ee.data.sampler import ResumableBatchSampler
from nemo_ee.models.early_exit_gpt import EarlyExitGPTModel, build_model
from nemo_ee.models.losses import ExitWeightSchedule
from nemo_ee.parallel.initialize import initialize_distributed
from nemo_ee.parallel.optimizer import OptimSettings, build_optimizer, wrap_ddp
from nemo_ee.parallel.schedules import ExitLossRecorder, run_forward_backward, split_microbatches

DEFAULT_CACHE = "~/.cache/nemo_ee"

# NeMo instantiates a restored model from the `target` in its config only inside an allow-list of
# namespaces (and only ModelPT / nn.Module subclasses). Register ours, as a plugin must.
if "nemo_ee.models." not in _nemo_common.ALLOWED_TARGET_PREFIXES:
    _nemo_common.ALLOWED_TARGET_PREFIXES.append("nemo_ee.models.")


class SafetensorsSaveRestoreConnector(SaveRestoreConnector):
    """Weights inside the .nemo as safetensors: restoring never unpickles untrusted code."""

    def __init__(self) -> None:
        super().__init__()
        self._model_weights_ckpt = "model_weights.safetensors"

    @staticmethod
    def _save_state_dict_to_disk(state_dict: dict, filepath: str) -> None:
        tensors = {}
        for key, value in state_dict.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
            tensors[key] = value.detach().cpu().contiguous().clone()
        save_file(tensors, filepath)

    @staticmethod
    def _load_state_dict_from_disk(model_weights: str, map_location: Any = "cpu") -> dict:
        return load_file(model_weights, device="cpu")


def _corpus_spec(data_cfg: DictConfig) -> CorpusSpec:
    return CorpusSpec(
        root=data_cfg.get("corpus_root"),
        val_fraction=float(data_cfg.get("val_fraction", 0.05)),
        max_files=data_cfg.get("max_files"),
    )


def _cache_dir(cfg: DictConfig) -> Path:
    return Path(os.path.expanduser(cfg.tokenizer.get("cache_dir") or os.environ.get("NEMO_EE_CACHE", DEFAULT_CACHE)))


def prepare_config(cfg: DictConfig) -> DictConfig:
    """Validate the recipe and fill in what is derived: the tokenizer file and the vocabulary size."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for section in ("arch", "tokenizer", "data", "optim"):
        if section not in cfg:
            raise ValueError(f"model config has no '{section}' section")
    EarlyExitConfig.from_dict(_arch_dict(cfg))  # fail before anything is trained or built
    OptimSettings(**OmegaConf.to_container(cfg.optim))
    mbs, gbs = int(cfg.micro_batch_size), int(cfg.global_batch_size)
    if mbs < 1 or gbs < 1 or gbs % mbs:
        raise ValueError(f"global_batch_size={gbs} must be a positive multiple of micro_batch_size={mbs}")
    _corpus_spec(cfg.data)
    fill = cfg.get("bubble_fill_microbatches", 0)
    if isinstance(fill, bool) or not isinstance(fill, int) or fill < 0:
        raise ValueError(f"bubble_fill_microbatches={fill!r} must be an integer >= 0")
    if fill and int(cfg.arch.get("pipeline_model_parallel_size", 1)) < 2:
        raise ValueError(f"bubble_fill_microbatches={fill} needs pipeline_model_parallel_size > 1 (no bubbles without it)")
    with open_dict(cfg):
        tokenizer_file = cfg.tokenizer.get("tokenizer_file")
        if not tokenizer_file:
            cfg.tokenizer.tokenizer_file = str(
                train_tokenizer(_corpus_spec(cfg.data), int(cfg.tokenizer.vocab_size), _cache_dir(cfg))
            )
        elif not str(tokenizer_file).startswith("nemo:") and not Path(tokenizer_file).is_file():
            raise FileNotFoundError(f"tokenizer.tokenizer_file {tokenizer_file} does not exist")
        bundle = cfg.tokenizer.get("hf_tokenizer_file")
        if bundle and not str(bundle).startswith("nemo:") and not Path(bundle).is_file():
            raise FileNotFoundError(f"tokenizer.hf_tokenizer_file {bundle} does not exist")
    return cfg


def _arch_dict(cfg: DictConfig) -> dict:
    """The ``arch`` section as EarlyExitConfig fields; the vocabulary defaults to the tokenizer's size."""
    arch = dict(OmegaConf.to_container(cfg.arch, resolve=True))
    arch.setdefault("vocab_size", int(cfg.tokenizer.vocab_size))
    return arch


class EarlyExitGPTNeMoModel(ModelPT):
    """An early-exit GPT as a NeMo model: trains with a Lightning Trainer, saves to .nemo."""

    def __init__(self, cfg: DictConfig, trainer: Optional[Trainer] = None) -> None:
        if not self._is_model_being_restored():
            cfg = prepare_config(cfg)
        super().__init__(cfg=cfg, trainer=trainer)
        self._save_restore_connector = SafetensorsSaveRestoreConnector()
        tokenizer_file = self.register_artifact("tokenizer.tokenizer_file", self.cfg.tokenizer.tokenizer_file)
        hf_bundle = self.cfg.tokenizer.get("hf_tokenizer_file")
        if hf_bundle:  # an imported model: its own HF tokenizer (chat template, eos/bos/pad kept as they are)
            hf_bundle = self.register_artifact("tokenizer.hf_tokenizer_file", hf_bundle)
        self.tokenizer = load_tokenizer(tokenizer_file, hf_bundle)
        self.ee_config = EarlyExitConfig.from_dict(_arch_dict(self.cfg))
        if self.ee_config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"arch.vocab_size={self.ee_config.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens ({tokenizer_file})"
            )
        initialize_distributed(
            self.ee_config.tensor_model_parallel_size, self.ee_config.pipeline_model_parallel_size, int(self.cfg.seed),
            embedding_stages=self.ee_config.embedding_stages,
        )
        self.model: EarlyExitGPTModel = build_model(self.ee_config)
        self.weight_schedule = ExitWeightSchedule.from_config(self.ee_config)
        self.automatic_optimization = False
        self._ddp_holder: list = []  # megatron DDP wrapper, kept out of the module tree (clean state-dict keys)
        self._val_recorder: Optional[ExitLossRecorder] = None
        self.last_val_losses: dict[str, float] = {}
        self.last_train_losses: dict[str, float] = {}
        self._dataset_pair = None
        self._fill_batches = None
        if trainer is not None and not self._is_model_being_restored():
            self.setup_training_data(self.cfg.data)
            self.setup_validation_data(self.cfg.data)

    # ------------------------------------------------------------------ NeMo ModelPT API
    @classmethod
    def restore_from(cls, restore_path: str, *args: Any, save_restore_connector: Any = None, **kwargs: Any):
        """Restore a .nemo written by :meth:`save_to` (safetensors weights, tokenizer inside)."""
        if not Path(restore_path).is_file():
            raise FileNotFoundError(f"no .nemo file at {restore_path}")
        connector = save_restore_connector or SafetensorsSaveRestoreConnector()
        return super().restore_from(restore_path, *args, save_restore_connector=connector, **kwargs)

    def save_to(self, save_path: str) -> None:
        """A .nemo of the whole model: only where one rank holds it (tensor x pipeline parallel = 1)."""
        if self.ee_config.tensor_model_parallel_size * self.ee_config.pipeline_model_parallel_size > 1:
            raise RuntimeError("save_to needs the whole model on one rank; under tensor/pipeline parallelism "
                               "save a distributed checkpoint (nemo_ee.checkpoint.dist.save_model) instead")
        super().save_to(save_path)

    @classmethod
    def list_available_models(cls) -> list:
        return []  # no pretrained checkpoints can be downloaded; everything is trained locally

    def _datasets(self):
        """(train, validation) token-window datasets, tokenized once and cached on disk."""
        if self._dataset_pair is None:
            spec = _corpus_spec(self.cfg.data)
            self._dataset_pair = build_datasets(spec, self.tokenizer, self.ee_config.seq_length, _cache_dir(self.cfg))
        return self._dataset_pair

    def _dp(self) -> tuple[int, int]:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    def setup_training_data(self, train_data_config: DictConfig) -> None:
        train_ds, _ = self._datasets()
        dp_rank, dp_size = self._dp()
        sampler = ResumableBatchSampler(
            len(train_ds), int(self.cfg.global_batch_size), int(self._trainer.max_steps), int(self.cfg.seed),
            start_step=lambda: self.trainer.global_step, dp_rank=dp_rank, dp_size=dp_size,
        )
        self._train_dl = DataLoader(train_ds, batch_sampler=sampler, num_workers=int(train_data_config.get("num_workers", 0)))
        self._fill_batches = None
        fill = int(self.cfg.get("bubble_fill_microbatches", 0))
        if fill:  # a second, independent sample stream for the bubble-fill micro-batches
            mbs = int(self.cfg.micro_batch_size)
            fill_sampler = ResumableBatchSampler(
                len(train_ds), fill * mbs * dp_size, int(self._trainer.max_steps), int(self.cfg.seed) + 1,
                start_step=lambda: self.trainer.global_step, dp_rank=dp_rank, dp_size=dp_size,
            )
            self._fill_loader = DataLoader(train_ds, batch_sampler=fill_sampler)

    def setup_validation_data(self, val_data_config: DictConfig) -> None:
        _, val_ds = self._datasets()
        dp_rank, dp_size = self._dp()
        gbs = int(self.cfg.global_batch_size)
        steps = max(1, len(val_ds) // gbs)
        sampler = ResumableBatchSampler(len(val_ds), gbs, steps, 0, dp_rank=dp_rank, dp_size=dp_size, shuffle=False)
        self._validation_dl = DataLoader(val_ds, batch_sampler=sampler)

    # ------------------------------------------------------------------ forward / steps
    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        """The wrapped EarlyExitGPTModel's forward: (final, {exit index: exit}) logits or per-token losses."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.model(tokens, position_ids, None, labels=labels)

    @property
    def ddp_model(self):
        if not self._ddp_holder:
            raise RuntimeError("the model has no optimizer yet: configure_optimizers() builds megatron's DDP wrapper")
        return self._ddp_holder[0]

    def configure_optimizers(self):
        ddp = wrap_ddp(self.model)
        self._ddp_holder[:] = [ddp]
        optimizer = build_optimizer(ddp, OptimSettings(**OmegaConf.to_container(self.cfg.optim)), int(self.trainer.max_steps))
        ddp.config.grad_scale_func = optimizer.optimizer.scale_loss
        ddp.config.no_sync_func = ddp.no_sync
        return optimizer

    def _next_fill_microbatches(self) -> Optional[list[dict]]:
        """This step's bubble-fill micro-batches (None when filling is off)."""
        if not int(self.cfg.get("bubble_fill_microbatches", 0)):
            return None
        if self._fill_batches is None:
            self._fill_batches = iter(self._fill_loader)
        return split_microbatches(next(self._fill_batches), int(self.cfg.micro_batch_size))

    def _run(self, batch: dict, recorder: ExitLossRecorder, forward_only: bool, iteration: int) -> None:
        microbatches = split_microbatches(batch, int(self.cfg.micro_batch_size))
        chunk = self.ddp_model if self._ddp_holder else self.model
        run_forward_backward(
            [chunk], microbatches, self.weight_schedule.weights(iteration), recorder,
            self.model.config, self.ee_config.seq_length, forward_only=forward_only,
            fill_microbatches=None if forward_only else self._next_fill_microbatches(),
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        self.ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        iteration = self.trainer.global_step
        recorder = ExitLossRecorder(self.ee_config.num_exits)
        self._run(batch, recorder, forward_only=False, iteration=iteration)
        optimizer.step()
        losses = recorder.reduce()
        self.last_train_losses = losses
        adapter = optimizer.optimizer
        self.log("train_loss", losses["final"], prog_bar=True, batch_size=1)
        self.log("lr", float(adapter.param_groups[0]["lr"]), batch_size=1)
        if adapter.last_grad_norm is not None:
            self.log("grad_norm", float(adapter.last_grad_norm), batch_size=1)
        for i, (layer, weight) in enumerate(zip(self.ee_config.exit_layer_nums, self.weight_schedule.weights(iteration))):
            self.log(f"train_exit_l{layer}_loss", losses[f"exit{i}"], prog_bar=True, batch_size=1)
            self.log(f"exit_l{layer}_weight", weight, batch_size=1)
            if f"fill_exit{i}" in losses:
                self.log(f"train_fill_exit_l{layer}_loss", losses[f"fill_exit{i}"], batch_size=1)
        return torch.tensor(losses["final"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Log steps continue where they stopped: one optimizer step per batch, so ``_batches_that_stepped``
        equals ``global_step``; Lightning saves it one short when the checkpoint is written mid-batch-end."""
        loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict")
        if loop is not None and "global_step" in checkpoint:
            loop["_batches_that_stepped"] = max(int(loop.get("_batches_that_stepped", 0)), int(checkpoint["global_step"]))

    def on_validation_epoch_start(self) -> None:
        self._val_recorder = ExitLossRecorder(self.ee_config.num_exits)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._run(batch, self._val_recorder, forward_only=True, iteration=self.trainer.global_step)

    def on_validation_epoch_end(self) -> None:
        losses = self._val_recorder.reduce()
        self.last_val_losses = {"final": losses["final"]}
        self.log("val_loss", losses["final"], batch_size=1)
        parts = [f"final {losses['final']:.4f}"]
        for i, layer in enumerate(self.ee_config.exit_layer_nums):
            value = losses[f"exit{i}"]
            self.last_val_losses[f"exit_l{layer}"] = value
            self.log(f"val_exit_l{layer}_loss", value, batch_size=1)
            parts.append(f"exit@{layer} {value:.4f}")
        if self.trainer.global_rank == 0:
            logging.info(f"step {self.trainer.global_step} validation loss: " + ", ".join(parts))
