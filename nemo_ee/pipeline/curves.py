"""Stage ``loss_curves``: per-exit training loss curves of both pretrainings (their TensorBoard event files)
and of EE-Tuning (its log), in one PNG for the report."""
from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

from omegaconf import DictConfig

from nemo_ee.pipeline.base import StageContext, StageResult, write_json
from nemo_ee.pipeline.report import Section, markdown_table

_TRAIN = re.compile(r"^train_(exit_l\d+)_loss$")
_VAL = re.compile(r"^val_(exit_l\d+)_loss$")
_TUNE_LINE = re.compile(r"^step (\d+)/\d+: (.*)$")

Curves = dict[str, list[tuple[float, float]]]


def tensorboard_curves(log_dir: Path) -> Curves:
    """Per-exit and final loss curves ({label: [(step, loss)]}) from every event file under ``log_dir``.

    Labels: ``final``, ``exit at layer k`` (training loss) and ``val ...`` (validation loss); a step logged
    twice (a resumed run) keeps its last value.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[float, float]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            label = _label(tag)
            if label is not None:
                for event in acc.Scalars(tag):
                    curves.setdefault(label, {})[float(event.step)] = float(event.value)
    return {k: sorted(v.items()) for k, v in sorted(curves.items(), key=lambda kv: _order(kv[0]))}


def _label(tag: str) -> Any:
    if tag == "train_loss":
        return "final"
    if tag == "val_loss":
        return "val final"
    for pattern, prefix in ((_TRAIN, ""), (_VAL, "val ")):
        match = pattern.match(tag)
        if match:
            return f"{prefix}exit at layer {match.group(1)[len('exit_l'):]}"
    return None


def _order(label: str) -> tuple:
    digits = re.findall(r"\d+", label)
    return (label.startswith("val"), "final" in label, int(digits[0]) if digits else 0)


def tuning_curves(log: Path) -> Curves:
    """Per-exit training loss curves from an EE-Tuning log (its ``step n/N: exit_l2=... exit_l4=...`` lines)."""
    curves: Curves = {}
    if not Path(log).is_file():
        return curves
    for line in Path(log).read_text(encoding="utf-8", errors="replace").splitlines():
        match = _TUNE_LINE.match(line.strip())
        if not match:
            continue
        for item in match.group(2).split():
            key, _, value = item.partition("=")
            if key.startswith("exit_l"):
                curves.setdefault(f"exit at layer {key[len('exit_l'):]}", []).append((float(match.group(1)),
                                                                                      float(value)))
    return curves


class _Tee:
    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


@contextlib.contextmanager
def tee_stdout(path: Path) -> Iterator[None]:
    """Copy everything printed inside the block to ``path`` as well (the EE-Tuning log)."""
    with open(path, "w", encoding="utf-8") as log:
        previous = sys.stdout
        sys.stdout = _Tee(previous, log)  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout = previous


def curves_settings(cfg: DictConfig) -> dict:
    """No settings of its own: it reruns when an upstream stage does."""
    return {}


def run_loss_curves(ctx: StageContext) -> StageResult:
    """Read the pretraining event files and the tuning log; one PNG panel per run, a table of first/last values."""
    from nemo_ee.plots import loss_curves

    panels: dict[str, Curves] = {}
    for name, title in (("pretrain_plain", "Pretraining: plain GPT"), ("pretrain_ee", "Pretraining: early-exit GPT")):
        if name in ctx.inputs and (ctx.run_dir / name).is_dir():
            panels[title] = tensorboard_curves(ctx.run_dir / name)
    if "ee_tune" in ctx.inputs:
        panels["EE-Tuning (backbone frozen)"] = tuning_curves(Path(ctx.inputs["ee_tune"].get("log_file")
                                                                   or ctx.run_dir / "ee_tune" / "tune.log"))
    missing = [k for k, v in panels.items() if not v]
    panels = {k: v for k, v in panels.items() if v}
    json_path = ctx.stage_dir / "loss_curves.json"
    write_json(json_path, panels)
    rows = [[run, label, points[0][1], points[-1][1], int(points[-1][0])]
            for run, curves in panels.items() for label, points in curves.items()]
    body = ("Training loss of every exit and of the final output along training (one micro-batch per logged "
            "step, so noisy; dashed: validation). Pretraining curves come from the TensorBoard event files, "
            "EE-Tuning's from its log.")
    artefacts: dict[str, Any] = {"curves_json": str(json_path)}
    if panels:
        png = loss_curves(ctx.stage_dir / "loss_curves.png", panels, "Loss per exit during training")
        artefacts["curves_png"] = str(png)
        body += (f"\n\n![loss curves per exit]({png.relative_to(ctx.run_dir).as_posix()})\n\n"
                 + markdown_table(["run", "curve", "first logged", "last logged", "last step"], rows))
    if missing:
        body += f"\n\nNo loss curves found for: {', '.join(missing)} (no event files / log in this run)."
    return StageResult(artefacts, [Section("Loss curves per exit", body)])
