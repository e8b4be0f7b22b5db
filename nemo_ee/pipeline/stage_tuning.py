"""Stages ``add_exits`` and ``ee_tune``: exits on the plain model, then EE-Tuning with the backbone frozen."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from nemo_ee.atomic import save_nemo
from nemo_ee.pipeline.base import COMMON_KEYS, StageContext, StageResult, nemo_arch, plain_dict, positive_ints
from nemo_ee.pipeline.curves import tee_stdout
from nemo_ee.pipeline.report import Section, markdown_table


def _exit_layers(cfg: DictConfig, given: dict) -> list[int]:
    from nemo_ee.tuning.add_exits import exit_layers_from_fractions

    fractions = cfg.stages.add_exits.exit_fractions
    if not OmegaConf.is_list(fractions) or not len(fractions):
        raise ValueError(f"stages.add_exits.exit_fractions={fractions!r} must be a non-empty list of numbers in (0, 1]")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"stages.add_exits.exit_fractions: {f!r} is outside (0, 1]")
    if "pretrain_plain" in given:
        num_layers = int(nemo_arch(given["pretrain_plain"]).get("num_layers", 8))
    else:
        num_layers = int(cfg.pretrain.model.arch.num_layers)
    try:
        return exit_layers_from_fractions(list(fractions), num_layers)
    except ValueError as exc:
        raise ValueError(f"stages.add_exits.exit_fractions: {exc}") from exc


def add_exits_settings(cfg: DictConfig) -> dict:
    """What the add_exits stage depends on: where the exits go, how they start, their loss weights."""
    stage = cfg.stages.add_exits
    return {k: plain_dict(stage)[k] for k in ("exit_fractions", "init", "exit_loss_weights")}


def check_add_exits(cfg: DictConfig, given: dict) -> None:
    """Fractions in (0, 1] that map to distinct layers of the plain model; init copy or random."""
    if "add_exits" in given:
        if not nemo_arch(given["add_exits"]).get("exit_layer_nums"):
            raise ValueError(f"stages.add_exits.nemo={given['add_exits']} has no exits")
        return
    _exit_layers(cfg, given)
    init = cfg.stages.add_exits.init
    if init not in ("copy", "random"):
        raise ValueError(f"stages.add_exits.init={init!r} is not one of ['copy', 'random']")


def run_add_exits(ctx: StageContext) -> StageResult:
    """Exits at the configured depth fractions on the plain model (copy-init from its final norm/output)."""
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel
    from nemo_ee.tuning.add_exits import add_exits, exit_layers_from_fractions

    src = ctx.inputs["pretrain_plain"]["nemo"]
    model = EarlyExitGPTNeMoModel.restore_from(src, map_location="cpu")
    fractions = list(ctx.stage_cfg.exit_fractions)
    layers = exit_layers_from_fractions(fractions, model.ee_config.num_layers)
    weights = plain_dict(ctx.stage_cfg)["exit_loss_weights"]
    new = add_exits(model, layers, exit_loss_weights=weights, init=str(ctx.stage_cfg.init))
    nemo = save_nemo(new, ctx.stage_dir / "ee_added.nemo")
    print(f"exits at layers {layers} of {model.ee_config.num_layers} (fractions {fractions}, {ctx.stage_cfg.init} "
          f"init) -> {nemo}", flush=True)
    body = (f"Exits after layers {layers} of {model.ee_config.num_layers} (fractions {fractions}) added to the plain "
            f"GPT, {ctx.stage_cfg.init}-initialised (norm and output projection from the final ones), output "
            f"weights untied; backbone copied bit-exactly. Model: `{nemo}`.")
    return StageResult({"nemo": str(nemo), "exit_layers": layers}, [Section("Adding exits", body)])


# ---------------------------------------------------------------------------------------------- EE-Tuning
_TUNE_OWN = ("nemo", "restore_from", "output", "overwrite", "name")


def ee_tune_settings(cfg: DictConfig) -> dict:
    """The ee_tuning keys that change the tuned model (not the paths the pipeline sets)."""
    stage = plain_dict(cfg.stages.ee_tune)
    return {k: v for k, v in stage.items() if k not in COMMON_KEYS and k not in _TUNE_OWN}


def check_tune_stage(cfg: DictConfig, name: str, given: dict) -> bool:
    """The checks every EE-Tuning stage (``ee_tune``, ``real_ee_tune``) shares: a given model has exits;
    restore_from / output left to the pipeline; step and batch counts positive; one process; a known optimizer.
    Returns whether the stage runs (False: its model is given)."""
    stage = cfg.stages[name]
    if name in given:
        if not nemo_arch(given[name]).get("exit_layer_nums"):
            raise ValueError(f"stages.{name}.nemo={given[name]} has no exits")
        return False
    for key in ("restore_from", "output"):
        if key in stage and not OmegaConf.is_missing(stage, key):
            raise ValueError(f"stages.{name}.{key} is set by the pipeline (the model with added exits and "
                             f"<run>/{name}/ee_tuned.nemo); remove it")
    positive_ints(name, plain_dict(stage), ("max_steps", "micro_batch_size"))
    pp = stage.get("pipeline_model_parallel_size", 1)
    if pp != 1:
        raise ValueError(f"stages.{name}.pipeline_model_parallel_size={pp!r}: the pipeline tunes in one process "
                         f"(1); for PP > 1 run scripts/ee_tune.py under torchrun and give its model as "
                         f"stages.{name}.nemo")
    if stage.get("optimizer", "torch") not in ("torch", "megatron"):
        raise ValueError(f"stages.{name}.optimizer={stage.get('optimizer')!r} is not one of ['torch', 'megatron']")
    return True


def check_ee_tune(cfg: DictConfig, given: dict) -> None:
    """:func:`check_tune_stage` for the tiny model's EE-Tuning."""
    check_tune_stage(cfg, "ee_tune", given)


def run_ee_tune(ctx: StageContext) -> StageResult:
    """Train the added exits with the backbone frozen (nemo_ee.tuning.ee_tune.tune_nemo)."""
    from nemo_ee.tuning.ee_tune import tune_nemo

    settings = {k: v for k, v in plain_dict(ctx.stage_cfg).items() if k not in COMMON_KEYS and k != "nemo"}
    out = ctx.stage_dir / "ee_tuned.nemo"
    settings.update(restore_from=ctx.inputs["add_exits"]["nemo"], output=str(out), overwrite=True)
    log = ctx.stage_dir / "tune.log"
    with tee_stdout(log):  # the loss_curves stage reads the per-step losses from it
        result = tune_nemo(OmegaConf.create(settings))
    layers = ctx.inputs["add_exits"].get("exit_layers")
    first, last = result.get("first") or {}, result.get("last") or {}
    rows = [[f"exit at layer {layers[i]}" if layers else f"exit {i}", first.get(i), last.get(i)] for i in sorted(last)]
    steps = int(result.get("steps", settings["max_steps"]))
    body = (f"{steps} steps, micro-batch {settings['micro_batch_size']}, lr {settings['optim']['lr']}, "
            f"backbone frozen. Training loss (one micro-batch) at the first and last step:\n\n"
            + markdown_table(["exit", "first step", "last step"], rows) + f"\n\nModel: `{out}`.")
    return StageResult({"nemo": str(out), "steps": steps, "log_file": str(log),
                        "first": {str(k): v for k, v in first.items()}, "last": {str(k): v for k, v in last.items()}},
                       [Section("EE-Tuning", body)])


