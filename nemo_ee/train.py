"""The pretraining job behind scripts/pretrain.py: Trainer + exp_manager + EarlyExitGPTNeMoModel."""
from __future__ import annotations

from typing import Optional

from lightning.pytorch import Trainer
from nemo.utils import logging
from nemo.utils.exp_manager import exp_manager
from omegaconf import DictConfig, OmegaConf

from nemo_ee.checkpoint.safe_io import SafeTorchCheckpointIO
from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel, prepare_config
from nemo_ee.parallel.strategy import configure_trainer_settings, exp_manager_settings


def make_trainer(cfg: DictConfig, **kwargs) -> Trainer:
    """A Lightning Trainer from the recipe's ``trainer`` section, loading checkpoints safely."""
    settings = OmegaConf.to_container(cfg.trainer, resolve=True)
    settings.update(kwargs)
    settings.setdefault("plugins", [SafeTorchCheckpointIO()])
    settings = configure_trainer_settings(settings, cfg.get("model"))  # torchrun's ranks; MegatronStrategy
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
    exp_manager(trainer, exp_manager_settings(cfg.get("exp_manager"), model_cfg))  # no .nemo if TP x PP > 1
    model = EarlyExitGPTNeMoModel(model_cfg, trainer=trainer)
    logging.info(f"early-exit GPT: {model.ee_config.parameter_count():,} parameters, exits after layers "
                 f"{model.ee_config.exit_layer_nums} of {model.ee_config.num_layers}")
    trainer.fit(model)
    trainer.ckpt_path = None  # exp_manager's resume path would otherwise reload the old weights to validate
    trainer.validate(model)
    if trainer.global_rank == 0:
        print(format_val_losses(model.last_val_losses), flush=True)
    return model
