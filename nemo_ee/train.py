"""The pretraining job behind scripts/pretrain.py: Trainer + exp_manager + EarlyExitGPTNeMoModel."""
from __future__ import annotations

from typing import Optional

from lightning.pytorch import Trainer
from nemo.utils import logging
from nemo.utils.exp_manager import exp_manager
from omegaconf import DictConfig, OmegaConf

from nemo_ee.checkpoint.safe_io import SafeTorchCheckpointIO
from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel, prepare_config


def make_trainer(cfg: DictConfig, **kwargs) -> Trainer:
    """A Lightning Trainer from the recipe's ``trainer`` section, loading checkpoints safely."""
    settings = OmegaConf.to_container(cfg.trainer, resolve=True)
    settings.update(kwargs)
    settings.setdefault("plugins", [SafeTorchCheckpointIO()])
    return Trainer(**settings)


def format_val_losses(losses: dict[str, float]) -> str:
    """A small table of per-exit validation losses, final output last."""
    rows = [(name, value) for name, value in losses.items() if name != "final"] + [("final", losses["final"])]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["validation loss per exit:"] + [f"  {name:<{width}}  {value:.4f}" for name, value in rows])


def pretrain(cfg: DictConfig, trainer: Optional[Trainer] = None) -> EarlyExitGPTNeMoModel:
    """Train the model the recipe describes, validate at the end, print per-exit validation loss."""
    model_cfg = prepare_config(cfg.model)  # bad config: clear error before the trainer starts
    if trainer is None:
        trainer = make_trainer(cfg)
    exp_manager(trainer, cfg.get("exp_manager"))
    model = EarlyExitGPTNeMoModel(model_cfg, trainer=trainer)
    logging.info(f"early-exit GPT: {model.ee_config.parameter_count():,} parameters, exits after layers "
                 f"{model.ee_config.exit_layer_nums} of {model.ee_config.num_layers}")
    trainer.fit(model)
    trainer.validate(model)
    if trainer.global_rank == 0:
        print(format_val_losses(model.last_val_losses), flush=True)
    return model
