"""Stage ``evaluate``: per-exit validation loss of the early-exit models on the same batches (table, JSON, PNG)."""
from __future__ import annotations

from omegaconf import DictConfig

from nemo_ee.pipeline.base import StageContext, StageResult, write_json
from nemo_ee.pipeline.report import Section, markdown_table, text_table

MODEL_LABELS = {"pretrain_ee": "EE-pretrained", "add_exits": "exits added (untuned)", "ee_tune": "EE-tuned"}


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
    from nemo_ee.plots import exit_loss_plot

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


