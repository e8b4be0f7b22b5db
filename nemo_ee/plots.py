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
    return _save(fig, path, note, 0.03)


def exit_loss_plot(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: Optional[str] = None) -> Path:
    """The per-exit validation loss table of :func:`nemo_ee.pipeline.evaluate.loss_table` as grouped bars."""
    groups = [str(row[0]) for row in rows]
    series = {str(label): [row[i + 1] for row in rows] for i, label in enumerate(headers[1:])}
    return grouped_bars(path, groups, series, "Validation loss per exit (lower is better)",
                        "cross-entropy (nats / token)", note)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(path: Path, panels: dict[str, dict[str, Sequence[tuple[float, float]]]], title: str,
                note: Optional[str] = None) -> Path:
    """One panel per training run (title -> {curve label: [(step, loss)]}), a line per exit / final output."""
    plt = _pyplot()
    names = [n for n, curves in panels.items() if curves]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5.2 * max(len(names), 1), 4.6), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names):
        bases = list(dict.fromkeys(label.removeprefix("val ") for label in panels[name]))
        for label, points in panels[name].items():
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            val = label.startswith("val ")  # validation: dashed, the colour of the same output's training curve
            color = COLORS[bases.index(label.removeprefix("val ")) % len(COLORS)]
            if not val and len(ys) >= 25:  # one micro-batch per point: raw faint, running mean of 5 on top
                ax.plot(xs, ys, "-", lw=0.8, alpha=0.3, color=color)
                ys = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
                label += " (mean of 5)"
            ax.plot(xs, ys, "--" if val else "-", marker="o" if val or len(xs) < 12 else None, ms=4, lw=1.6,
                    color=color, label=label)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("training step", fontsize=10)
        ax.set_ylabel("cross-entropy (nats / token)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8.5, loc="upper right")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path, note, 0.04)


def sweep_comparison(path: Path, sweeps: dict[str, Sequence[dict]], target: float, title: str,
                     note: Optional[str] = None) -> Path:
    """Speedup (top) and greedy agreement (bottom) against the exit threshold, a line per model."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.5, 7.2), dpi=110, sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1]})
    for c, (label, rows) in enumerate(sweeps.items()):
        t = [r["threshold"] for r in rows]
        color = COLORS[c % len(COLORS)]
        top.plot(t, [r["speedup"] for r in rows], "o-", color=color, lw=1.8, label=f"{label}: measured")
        top.plot(t, [r["ideal_speedup"] for r in rows], "s:", color=color, lw=1.2, ms=4, alpha=0.8,
                 label=f"{label}: ideal (layers / mean exit depth)")
        bottom.plot(t, [r["agreement"] for r in rows], "o-", color=color, lw=1.8, label=label)
    top.axhline(1.0, color="grey", lw=0.8)
    top.set_ylabel("speedup over full decoding (x)", fontsize=10)
    top.set_title(title, fontsize=11)
    bottom.axhline(target, color="#C44E52", ls="--", lw=1, label=f"agreement target {target}")
    bottom.set_ylabel("greedy agreement with the full model", fontsize=10)
    bottom.set_xlabel("max-prob exit threshold (a token leaves at the first exit whose top probability >= it)",
                      fontsize=9.5)
    low = min([target] + [r["agreement"] for rows in sweeps.values() for r in rows])
    bottom.set_ylim(max(0.0, low - 0.05), 1.01)  # zoomed on the range the models cover
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8.5, loc="best")
    bottom.invert_xaxis()  # strict (1.0, full decoding) on the left, loose (0.0) on the right
    return _save(fig, path, note, 0.03)


def selfspec_plot(path: Path, rows: Sequence[dict], title: str, note: Optional[str] = None) -> Path:
    """Self-speculative speedup over full decoding (bars) and the share of drafted tokens (line) per draft length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=110)
    ks = [str(r["num_draft"]) for r in rows]
    bars = ax.bar(ks, [r["speedup"] for r in rows], color=COLORS[0], label="speedup over full decoding")
    ax.bar_label(bars, labels=[f"{r['speedup']:.2f}{'' if r['identical'] else ' (not identical!)'}" for r in rows],
                 padding=2, fontsize=9)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("tokens drafted per verification (k)", fontsize=10)
    ax.set_ylabel("speedup (x), output identical to full", fontsize=10)
    ax.set_ylim(0, max([1.0] + [r["speedup"] for r in rows]) * 1.2)
    share = ax.twinx()
    share.plot(ks, [r["draft_share"] for r in rows], "o-", color=COLORS[1], label="share of tokens drafted")
    share.set_ylim(0, 1.05)
    share.set_ylabel("share of output tokens that were drafted", fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=9, loc="upper right")
    return _save(fig, path, note, 0.03)


def line_plot(path: Path, series: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
              note: Optional[str] = None, marks: Optional[dict[str, tuple[float, float]]] = None,
              log2x: bool = False) -> Path:
    """One line per series of (x, y) points; ``marks``: single labelled points (name -> (x, y))."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for s, (name, points) in enumerate(series.items()):
        xs, ys = [x for x, _ in points], [y for _, y in points]
        ax.plot(xs, ys, marker="o", label=name, color=COLORS[s % len(COLORS)])
    for m, (name, (x, y)) in enumerate((marks or {}).items()):
        ax.scatter([x], [y], marker="*", s=160, zorder=3, label=name, color=COLORS[(len(series) + m) % len(COLORS)])
    if log2x:
        ax.set_xscale("log", base=2)
        ticks = sorted({x for points in series.values() for x, _ in points})
        ax.set_xticks(ticks, [str(int(t)) for t in ticks])
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(title, fontsize=12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path, note, 0.03)


def _save(fig: Any, path: Path, note: Optional[str], note_height: float) -> Path:
    """Footnote (if any), tight layout leaving ``note_height`` for it, write the PNG, free the figure."""
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, note_height if note else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path
