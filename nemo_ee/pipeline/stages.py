"""The pipeline's stages, one function each, and :data:`STAGES`, the ordered list the runner walks.

To add a stage: write ``run_<name>(ctx) -> StageResult`` (plus a ``settings`` function for its config
hash and, if it has settings to validate, a ``check``), append a :class:`Stage` to :data:`STAGES`, and give
it a ``stages.<name>`` section in conf/pipeline_tiny.yaml. Its report sections appear in stage order.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_ee.pipeline.base import COMMON_KEYS, Stage, StageContext, StageResult, write_json
from nemo_ee.pipeline.report import Section, markdown_table, text_table

MODEL_LABELS = {"pretrain_ee": "EE-pretrained", "add_exits": "exits added (untuned)", "ee_tune": "EE-tuned"}


def _plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def _save_nemo(model: Any, path: Path) -> Path:
    """``model.save_to`` via a temp file and ``os.replace``: a killed save never leaves a half .nemo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.nemo")
    try:
        model.save_to(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _nemo_arch(path: str) -> dict:
    from nemo_ee.tuning.add_exits import read_nemo_config

    return _plain(read_nemo_config(path).arch)


# ---------------------------------------------------------------------------------------------- corpus
def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.1f} kB"


def corpus_settings(cfg: DictConfig) -> dict:
    """What the corpus stage depends on: the data section, vocabulary size, window length, given tokenizer."""
    model = cfg.pretrain.model
    return {"data": {k: model.data.get(k) for k in ("corpus_root", "val_fraction", "max_files")},
            "vocab_size": model.tokenizer.vocab_size, "seq_length": model.arch.seq_length,
            "tokenizer_file": cfg.stages.corpus.get("tokenizer_file")}


def check_corpus(cfg: DictConfig, given: dict) -> None:
    """The corpus spec (root, split, max_files) and a given tokenizer file, before any work."""
    from nemo_ee.models.nemo_model import _corpus_spec

    _corpus_spec(cfg.pretrain.model.data)  # bad corpus_root / val_fraction / max_files
    path = cfg.stages.corpus.get("tokenizer_file")
    if path is not None and not Path(str(path)).is_file():
        raise ValueError(f"stages.corpus.tokenizer_file={path}: no such file")


def run_corpus(ctx: StageContext) -> StageResult:
    """Train (or reuse) the byte-level BPE on the corpus' train split and tokenize both splits (cached)."""
    from nemo_ee.data import EETokenizer, build_datasets, split_files, train_tokenizer
    from nemo_ee.models.nemo_model import _cache_dir, _corpus_spec

    model = ctx.cfg.pretrain.model
    spec, cache = _corpus_spec(model.data), _cache_dir(model)
    train_files, val_files = split_files(spec)
    given = ctx.stage_cfg.get("tokenizer_file")
    tok_path = Path(str(given)) if given else train_tokenizer(spec, int(model.tokenizer.vocab_size), cache)
    tokenizer = EETokenizer.from_file(tok_path)
    train_ds, val_ds = build_datasets(spec, tokenizer, int(model.arch.seq_length), cache)
    stats = {
        "corpus_root": str(spec.root_path), "train_files": len(train_files), "val_files": len(val_files),
        "train_bytes": sum(p.stat().st_size for p in train_files), "val_bytes": sum(p.stat().st_size for p in val_files),
        "train_tokens": int(len(train_ds.tokens)), "val_tokens": int(len(val_ds.tokens)),
        "train_windows": len(train_ds), "val_windows": len(val_ds), "vocab_size": tokenizer.vocab_size,
        "seq_length": int(model.arch.seq_length), "cache_dir": str(cache),
    }
    rows = [[split, stats[f"{split}_files"], _size(stats[f"{split}_bytes"]), stats[f"{split}_tokens"],
             stats[f"{split}_windows"]] for split in ("train", "val")]
    headers = ["split", "files", "size", "tokens", f"windows of {stats['seq_length']}"]
    print(text_table(headers, rows), flush=True)
    body = (f"Corpus: `.py` files under `{stats['corpus_root']}`, split by file. Tokenizer: byte-level BPE, "
            f"{stats['vocab_size']} tokens, `{tok_path}` "
            f"({(stats['train_bytes'] + stats['val_bytes']) / max(stats['train_tokens'] + stats['val_tokens'], 1):.2f} "
            f"bytes per token). Cached in `{cache}`.\n\n" + markdown_table(headers, rows))
    return StageResult({"tokenizer_file": str(tok_path), **stats}, [Section("Corpus and tokenizer", body)])


# ---------------------------------------------------------------------------------------------- pretraining
def pretrain_config(cfg: DictConfig, stage: str, plain: bool, run_dir: Path, tokenizer_file: Any = None) -> DictConfig:
    """The recipe a pretrain stage trains: ``cfg.pretrain``, logs/checkpoints in ``<run_dir>/<stage>/``;
    ``plain``: the same model without exits (per-exit list settings reset to their defaults)."""
    import dataclasses

    from nemo_ee.config import EarlyExitConfig

    recipe = OmegaConf.create(_plain(cfg.pretrain))
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
    recipe = _plain(pretrain_config(cfg, "x", plain, Path(".")))
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
    arch = {"vocab_size": int(model.tokenizer.vocab_size), **_plain(model.arch)}
    try:
        ee = EarlyExitConfig.from_dict(arch)
        OptimSettings(**_plain(model.optim))
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
    nemo = _save_nemo(model, ctx.stage_dir / f"{stage}.nemo")
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
        if not _nemo_arch(given["pretrain_ee"]).get("exit_layer_nums"):
            raise ValueError(f"stages.pretrain_ee.nemo={given['pretrain_ee']} has no exits")
        return
    _check_pretrain(cfg, False, "pretrain_ee")


# ---------------------------------------------------------------------------------------------- add exits
def _exit_layers(cfg: DictConfig, given: dict) -> list[int]:
    from nemo_ee.tuning.add_exits import exit_layers_from_fractions

    fractions = cfg.stages.add_exits.exit_fractions
    if not OmegaConf.is_list(fractions) or not len(fractions):
        raise ValueError(f"stages.add_exits.exit_fractions={fractions!r} must be a non-empty list of numbers in (0, 1]")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"stages.add_exits.exit_fractions: {f!r} is outside (0, 1]")
    if "pretrain_plain" in given:
        num_layers = int(_nemo_arch(given["pretrain_plain"]).get("num_layers", 8))
    else:
        num_layers = int(cfg.pretrain.model.arch.num_layers)
    try:
        return exit_layers_from_fractions(list(fractions), num_layers)
    except ValueError as exc:
        raise ValueError(f"stages.add_exits.exit_fractions: {exc}") from exc


def add_exits_settings(cfg: DictConfig) -> dict:
    """What the add_exits stage depends on: where the exits go, how they start, their loss weights."""
    stage = cfg.stages.add_exits
    return {k: _plain(stage)[k] for k in ("exit_fractions", "init", "exit_loss_weights")}


def check_add_exits(cfg: DictConfig, given: dict) -> None:
    """Fractions in (0, 1] that map to distinct layers of the plain model; init copy or random."""
    if "add_exits" in given:
        if not _nemo_arch(given["add_exits"]).get("exit_layer_nums"):
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
    weights = _plain(ctx.stage_cfg)["exit_loss_weights"]
    new = add_exits(model, layers, exit_loss_weights=weights, init=str(ctx.stage_cfg.init))
    nemo = _save_nemo(new, ctx.stage_dir / "ee_added.nemo")
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
    stage = _plain(cfg.stages.ee_tune)
    return {k: v for k, v in stage.items() if k not in COMMON_KEYS and k not in _TUNE_OWN}


def check_ee_tune(cfg: DictConfig, given: dict) -> None:
    """restore_from / output left to the pipeline; step and batch counts positive; a known optimizer."""
    stage = cfg.stages.ee_tune
    if "ee_tune" in given:
        if not _nemo_arch(given["ee_tune"]).get("exit_layer_nums"):
            raise ValueError(f"stages.ee_tune.nemo={given['ee_tune']} has no exits")
        return
    for key in ("restore_from", "output"):
        if key in stage and not OmegaConf.is_missing(stage, key):
            raise ValueError(f"stages.ee_tune.{key} is set by the pipeline (the add_exits model and "
                             f"<run>/ee_tune/ee_tuned.nemo); remove it")
    for key in ("max_steps", "micro_batch_size"):
        value = stage.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"stages.ee_tune.{key}={value!r} must be an integer >= 1")
    if stage.get("optimizer", "torch") not in ("torch", "megatron"):
        raise ValueError(f"stages.ee_tune.optimizer={stage.get('optimizer')!r} is not one of ['torch', 'megatron']")


def run_ee_tune(ctx: StageContext) -> StageResult:
    """Train the added exits with the backbone frozen (nemo_ee.tuning.ee_tune.tune_nemo)."""
    from nemo_ee.tuning.ee_tune import tune_nemo

    settings = {k: v for k, v in _plain(ctx.stage_cfg).items() if k not in COMMON_KEYS and k != "nemo"}
    out = ctx.stage_dir / "ee_tuned.nemo"
    settings.update(restore_from=ctx.inputs["add_exits"]["nemo"], output=str(out), overwrite=True)
    result = tune_nemo(OmegaConf.create(settings))
    layers = ctx.inputs["add_exits"].get("exit_layers")
    first, last = result.get("first") or {}, result.get("last") or {}
    rows = [[f"exit at layer {layers[i]}" if layers else f"exit {i}", first.get(i), last.get(i)] for i in sorted(last)]
    body = (f"{result['steps']} steps, micro-batch {settings['micro_batch_size']}, lr {settings['optim']['lr']}, "
            f"backbone frozen. Training loss (one micro-batch) at the first and last step:\n\n"
            + markdown_table(["exit", "first step", "last step"], rows) + f"\n\nModel: `{out}`.")
    return StageResult({"nemo": str(out), "steps": int(result["steps"]),
                        "first": {str(k): v for k, v in first.items()}, "last": {str(k): v for k, v in last.items()}},
                       [Section("EE-Tuning", body)])


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_settings(cfg: DictConfig) -> dict:
    """What the evaluation depends on: how many validation batches of how many windows."""
    return {k: cfg.stages.evaluate.get(k) for k in ("val_batches", "batch_size")}


def check_evaluate(cfg: DictConfig, given: dict) -> None:
    """val_batches and batch_size are integers >= 1."""
    for key, value in evaluate_settings(cfg).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"stages.evaluate.{key}={value!r} must be an integer >= 1")


def run_evaluate(ctx: StageContext) -> StageResult:
    """Per-exit validation loss of the EE-pretrained and EE-tuned models on the same batches: table, JSON, PNG."""
    from nemo_ee.pipeline.evaluate import evaluate_models, loss_table
    from nemo_ee.pipeline.plots import exit_loss_plot

    paths = {MODEL_LABELS[name]: ctx.inputs[name]["nemo"] for name in ("pretrain_ee", "add_exits", "ee_tune")
             if name in ctx.inputs}
    results = evaluate_models(paths, int(ctx.stage_cfg.val_batches), int(ctx.stage_cfg.batch_size))
    headers, rows = loss_table(results)
    print(text_table(headers, rows), flush=True)
    json_path, png_path = ctx.stage_dir / "val_loss.json", ctx.stage_dir / "val_loss_per_exit.png"
    write_json(json_path, results)
    plotted = [h for h in headers[1:] if h != MODEL_LABELS["add_exits"]] or headers[1:]
    keep = [0] + [headers.index(h) for h in plotted]
    note = (f"{results['val_batches']} batches x {results['batch_size']} windows = {results['tokens']:,} validation "
            f"tokens, the same for every model")
    exit_loss_plot(png_path, [headers[i] for i in keep], [[row[i] for i in keep] for row in rows], note)
    rel = png_path.relative_to(ctx.run_dir).as_posix()
    body = (f"Cross-entropy per token on {results['val_batches']} validation batches of {results['batch_size']} "
            f"windows ({results['tokens']:,} tokens, spread evenly over the {results['val_split_windows']:,}-window "
            f"validation split), the same batches for every model. The EE-tuned model's final output is the plain "
            f"GPT's (its backbone is frozen).\n\n" + markdown_table(headers, rows) +
            f"\n\n![validation loss per exit]({rel})\n\nNumbers: `{json_path.relative_to(ctx.run_dir).as_posix()}`.")
    return StageResult({"val_loss_json": str(json_path), "val_loss_png": str(png_path),
                        "losses": {k: v["losses"] for k, v in results["models"].items()}},
                       [Section("Validation loss per exit", body)])


STAGES: list[Stage] = [
    Stage("corpus", "corpus and tokenizer", run_corpus, corpus_settings, keys=frozenset({"tokenizer_file"}),
          check=check_corpus),
    Stage("pretrain_plain", "pretrain the GPT without exits", run_pretrain_plain,
          lambda cfg: _pretrain_settings(cfg, True), wants=("corpus",), pointer="nemo", resumable=True,
          check=lambda cfg, given: None if "pretrain_plain" in given else _check_pretrain(cfg, True, "pretrain_plain")),
    Stage("pretrain_ee", "pretrain the early-exit GPT (same size, same steps)", run_pretrain_ee,
          lambda cfg: _pretrain_settings(cfg, False), wants=("corpus",), pointer="nemo", resumable=True,
          check=check_pretrain_ee),
    Stage("add_exits", "add exits to the plain GPT", run_add_exits, add_exits_settings, needs=("pretrain_plain",),
          pointer="nemo", keys=frozenset({"exit_fractions", "init", "exit_loss_weights"}), check=check_add_exits),
    Stage("ee_tune", "EE-Tuning: train the exits, backbone frozen", run_ee_tune, ee_tune_settings,
          needs=("add_exits",), pointer="nemo", keys=None, check=check_ee_tune),
    Stage("evaluate", "per-exit validation loss, EE-pretrained vs EE-tuned", run_evaluate, evaluate_settings,
          wants=("pretrain_ee", "add_exits", "ee_tune"), needs_any=True,
          keys=frozenset({"val_batches", "batch_size"}), check=check_evaluate),
]


def remove_stage_dir(stage_dir: Path) -> None:
    """Discard a stage's old outputs (``rerun=true`` or a changed config of a stage that cannot resume)."""
    if stage_dir.is_dir():
        shutil.rmtree(stage_dir)
