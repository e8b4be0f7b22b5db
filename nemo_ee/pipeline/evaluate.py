"""Per-exit validation loss of .nemo models on the validation split, every model on the very same batches."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, Path]


def validation_windows(num_windows: int, num_batches: int, batch_size: int) -> list[list[int]]:
    """Window indices of ``num_batches`` batches spread evenly over the split (deterministic, no repeats);
    fewer batches when the split is too small for ``num_batches``."""
    for name, value in (("val_batches", num_batches), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if batch_size > num_windows:
        raise ValueError(f"batch_size={batch_size} windows, but the validation split has only {num_windows}; "
                         f"lower stages.evaluate.batch_size")
    if num_batches * batch_size > num_windows:  # a small corpus: fewer batches rather than a failure at the end
        print(f"validation split: {num_windows} windows, fewer than val_batches x batch_size = {num_batches} x "
              f"{batch_size}; evaluating {num_windows // batch_size} batches", flush=True)
        num_batches = num_windows // batch_size
    wanted = num_batches * batch_size
    picks = [int(i * num_windows // wanted) for i in range(wanted)]
    return [picks[b * batch_size:(b + 1) * batch_size] for b in range(num_batches)]


def _data_key(model: Any) -> tuple:
    """What must match for two models to be scored on the same tokens: tokenizer, window length, corpus split."""
    data = model.cfg.data
    return (model.tokenizer.fingerprint, model.ee_config.seq_length, str(data.get("corpus_root")),
            float(data.get("val_fraction", 0.05)), data.get("max_files"))


@torch.no_grad()
def per_exit_loss(model: Any, batches: list[dict]) -> dict[str, float]:
    """Token-averaged CE of every exit (``exit_l<layer>``) and of the final output (``final``) over ``batches``."""
    net = model.model
    was_training = net.training
    net.eval()
    ee = model.ee_config
    sums = {name: 0.0 for name in [f"exit_l{layer}" for layer in ee.exit_layer_nums] + ["final"]}
    tokens = 0.0
    try:
        for batch in batches:
            out = net(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"].float()
            sums["final"] += float((out.output.float() * mask).sum())
            for index, ce in out.exits.items():
                sums[f"exit_l{ee.exit_layer_nums[index]}"] += float((ce.float() * mask).sum())
            tokens += float(mask.sum())
    finally:
        net.train(was_training)
    return {name: value / max(tokens, 1.0) for name, value in sums.items()}


def evaluate_models(paths: dict[str, PathLike], val_batches: int, batch_size: int) -> dict[str, Any]:
    """Restore each .nemo (one at a time) and score it on the same validation batches.

    Returns ``{"models": {label: {"nemo", "num_layers", "exit_layers", "losses"}}, "windows", "tokens"}``;
    ValueError when two models were not trained on the same tokenizer / window length / corpus split.
    """
    from nemo_ee.data import build_datasets
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel, _cache_dir, _corpus_spec

    if not paths:
        raise ValueError("no model to evaluate")
    results: dict[str, Any] = {"models": {}, "val_batches": val_batches, "batch_size": batch_size}
    batches, key, first = None, None, None
    for label, path in paths.items():
        model = EarlyExitGPTNeMoModel.restore_from(str(path), map_location="cpu")
        if batches is None:
            _, val_ds = build_datasets(_corpus_spec(model.cfg.data), model.tokenizer, model.ee_config.seq_length,
                                       _cache_dir(model.cfg))
            windows = validation_windows(len(val_ds), val_batches, batch_size)
            batches = [{k: torch.stack([val_ds[i][k] for i in idx]) for k in ("tokens", "labels", "loss_mask",
                                                                            "position_ids")} for idx in windows]
            key, first = _data_key(model), label
            results["val_batches"] = len(windows)
            results["windows"] = len(windows) * batch_size
            results["tokens"] = int(sum(float(b["loss_mask"].sum()) for b in batches))
            results["val_split_windows"] = len(val_ds)
        elif _data_key(model) != key:
            raise ValueError(f"{label} ({path}) was trained on other data than {first} (tokenizer, seq_length or "
                             f"corpus split differ): their validation losses are not comparable")
        losses = per_exit_loss(model, batches)
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"{label} ({path}) has non-finite validation losses {bad}")
        results["models"][label] = {"nemo": str(path), "num_layers": model.ee_config.num_layers,
                                    "exit_layers": list(model.ee_config.exit_layer_nums), "losses": losses}
        del model
    return results


def loss_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of :func:`evaluate_models`' numbers: one row per exit layer (union), then the final output."""
    models = results["models"]
    labels = list(models)
    layers = sorted({layer for m in models.values() for layer in m["exit_layers"]})
    num_layers = sorted({m["num_layers"] for m in models.values()})
    depth = "/".join(str(n) for n in num_layers)
    rows = [[f"exit at layer {layer} of {depth}"] + [models[lab]["losses"].get(f"exit_l{layer}") for lab in labels]
            for layer in layers]
    rows.append([f"final (layer {depth})"] + [models[lab]["losses"]["final"] for lab in labels])
    return ["output"] + labels, rows
