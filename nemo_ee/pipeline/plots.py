"""PNG plots for the report (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")


def grouped_bars(path: Path, groups: Sequence[str], series: dict[str, Sequence[Optional[float]]], title: str,
                 ylabel: str, note: Optional[str] = None) -> Path:
    """Bars per group (x) for each series (colour), values written on the bars; None leaves a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    top = 0.0
    for s, name in enumerate(names):
        xs = [g + (s - (len(names) - 1) / 2) * width for g in range(len(groups))]
        vals = series[name]
        kept = [(x, v) for x, v in zip(xs, vals) if v is not None]
        if not kept:
            continue
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width * 0.95, label=name,
                      color=COLORS[s % len(COLORS)])
        ax.bar_label(bars, labels=[f"{v:.3f}" for _, v in kept], padding=2, fontsize=9)
        top = max(top, max(v for _, v in kept))
    ax.set_xticks(range(len(groups)), list(groups), fontsize=10)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(title, fontsize=12)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=max(len(names), 1), fontsize=10, frameon=False)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def exit_loss_plot(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: Optional[str] = None) -> Path:
    """The per-exit validation loss table of :func:`nemo_ee.pipeline.evaluate.loss_table` as grouped bars."""
    groups = [str(row[0]) for row in rows]
    series = {str(label): [row[i + 1] for row in rows] for i, label in enumerate(headers[1:])}
    return grouped_bars(path, groups, series, "Validation loss per exit (lower is better)",
                        "cross-entropy (nats / token)", note)
