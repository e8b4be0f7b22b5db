"""Stages ``pretrain_plain`` and ``pretrain_ee``: the recipe trained without and with exits (nemo_ee.train)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_ee.atomic import save_nemo
from nemo_ee.pipeline.base import StageContext, StageResult, nemo_arch, plain_dict
from nemo_ee.pipeline.report import Section


def pretrain_config(cfg: DictConfig, stage: str, plain: bool, run_dir: Path, tokenizer_file: Any = None) -> DictConfig:
    """The recipe a pretrain stage trains: ``cfg.pretrain``, logs/checkpoints in ``<run_dir>/<stage>/``;
    ``plain``: the same model without exits (per-exit list settings reset to their defaults)."""
    import dataclasses

    from nemo_ee.config import EarlyExitConfig

    recipe = OmegaConf.create(plain_dict(cfg.pretrain))
    recipe.name = stage
    recipe.exp_manager.exp_dir = str(run_dir)
    recipe.exp_manager.name = stage
    recipe.exp_manager.checkpoint_callback_params.save_nemo_on_train_end = False  # the stage saves its own .nemo
    recipe.exp_manager.checkpoint_callback_params.always_save_nemo = False
    if tokenizer_file:
        recipe.model.tokenizer.tokenizer_file = str(tokenizer_file)
    if plain:
        defaults = {f.name: f.default for f in dataclasses.fields(EarlyExitConfig)}
        for key in list(recipe.model.arch):
            if key.startswith("exit_") and OmegaConf.is_list(recipe.model.arch[key]):
                recipe.model.arch[key] = [] if key == "exit_layer_nums" else defaults[key]
    return recipe


def _pretrain_settings(cfg: DictConfig, plain: bool) -> dict:
    recipe = plain_dict(pretrain_config(cfg, "x", plain, Path(".")))
    recipe.pop("exp_manager")
    recipe.pop("name")
    recipe["trainer"].pop("enable_progress_bar", None)
    recipe["model"]["tokenizer"].pop("tokenizer_file", None)  # covered by the corpus stage's hash
    recipe["model"]["data"].pop("num_workers", None)
    return recipe


def _check_pretrain(cfg: DictConfig, plain: bool, stage: str) -> None:
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.parallel.optimizer import OptimSettings

    model = pretrain_config(cfg, stage, plain, Path(".")).model
    arch = {"vocab_size": int(model.tokenizer.vocab_size), **plain_dict(model.arch)}
    try:
        ee = EarlyExitConfig.from_dict(arch)
        OptimSettings(**plain_dict(model.optim))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"pretrain recipe for {stage}: {exc}") from exc
    if ee.tensor_model_parallel_size * ee.pipeline_model_parallel_size != 1:
        raise ValueError(f"pretrain recipe for {stage}: the pipeline runs in one process (TP=PP=1), got "
                         f"TP={ee.tensor_model_parallel_size} PP={ee.pipeline_model_parallel_size}")
    if not plain and not ee.exit_layer_nums:
        raise ValueError("pretrain.model.arch.exit_layer_nums is empty: the EE-pretrained model needs exits")
    steps = cfg.pretrain.trainer.max_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"pretrain.trainer.max_steps={steps!r} must be an integer >= 1")


def _run_pretrain(ctx: StageContext, plain: bool) -> StageResult:
    from nemo_ee.train import pretrain

    stage = ctx.stage_dir.name
    tokenizer_file = ctx.inputs.get("corpus", {}).get("tokenizer_file")
    model = pretrain(pretrain_config(ctx.cfg, stage, plain, ctx.run_dir, tokenizer_file))
    nemo = save_nemo(model, ctx.stage_dir / f"{stage}.nemo")
    ee = model.ee_config
    losses = {k: float(v) for k, v in model.last_val_losses.items()}
    what = "plain GPT (no exits)" if plain else f"early-exit GPT (exits after layers {ee.exit_layer_nums})"
    body = (f"{what}: {ee.num_layers} layers, hidden {ee.hidden_size}, {ee.parameter_count():,} parameters, "
            f"{int(model.trainer.global_step)} steps of {int(model.cfg.global_batch_size)} x {ee.seq_length} tokens. "
            f"Validation loss at the end of training (Lightning, {ctx.cfg.pretrain.trainer.limit_val_batches} "
            f"batches): " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()) +
            f". TensorBoard logs and checkpoints: `{ctx.stage_dir}`; model: `{nemo}`.")
    title = "Pretraining: plain GPT" if plain else "Pretraining: early-exit GPT"
    return StageResult({"nemo": str(nemo), "steps": int(model.trainer.global_step), "val_loss": losses,
                        "parameters": ee.parameter_count()}, [Section(title, body)])


def run_pretrain_plain(ctx: StageContext) -> StageResult:
    """Pretrain the recipe's GPT without exits (resumes from its last checkpoint)."""
    return _run_pretrain(ctx, plain=True)


def run_pretrain_ee(ctx: StageContext) -> StageResult:
    """Pretrain the recipe's early-exit GPT, same shape and steps (resumes from its last checkpoint)."""
    return _run_pretrain(ctx, plain=False)


def check_pretrain_ee(cfg: DictConfig, given: dict) -> None:
    """A given EE model must have exits; otherwise the recipe must build an early-exit GPT."""
    if "pretrain_ee" in given:
        if not nemo_arch(given["pretrain_ee"]).get("exit_layer_nums"):
            raise ValueError(f"stages.pretrain_ee.nemo={given['pretrain_ee']} has no exits")
        return
    _check_pretrain(cfg, False, "pretrain_ee")




def pretrain_plain_settings(cfg: DictConfig) -> dict:
    """The plain pretraining's recipe, minus what does not change the model (logging, paths)."""
    return _pretrain_settings(cfg, True)


def pretrain_ee_settings(cfg: DictConfig) -> dict:
    """The EE pretraining's recipe, minus what does not change the model (logging, paths)."""
    return _pretrain_settings(cfg, False)


def check_pretrain_plain(cfg: DictConfig, given: dict) -> None:
    """The plain recipe builds (exits removed), unless a plain model is given."""
    if "pretrain_plain" not in given:
        _check_pretrain(cfg, True, "pretrain_plain")
