"""The run's report, ``<run_dir>/report.md``: a header, the stage table, then the sections stages contribute.

Stages return :class:`Section` objects; the runner keeps them in each stage's done-marker and rewrites the
whole report after every run, in stage order, so a later stage only has to return its own sections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence


@dataclass
class Section:
    """One part of the report: a ``##`` title and a markdown body (images as links relative to the run dir)."""

    title: str
    body: str

    def to_dict(self) -> dict:
        """The JSON form kept in a stage's done-marker."""
        return {"title": self.title, "body": self.body}

    @classmethod
    def from_dict(cls, data: dict) -> "Section":
        """Back from :meth:`to_dict`."""
        return cls(str(data["title"]), str(data["body"]))


def format_number(value: Any, digits: int = 4) -> str:
    """A table cell: floats with ``digits`` decimals, missing values as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    cells = [[format_number(c, digits) for c in row] for row in rows]
    align = ["---:" if any(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows) else "---"
             for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """The same table as plain aligned text, for the terminal."""
    cells = [list(headers)] + [[format_number(c, digits) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_report(title: str, stage_rows: Sequence[Sequence[Any]], sections: Sequence[Section],
                  preamble: Optional[str] = None) -> str:
    """The report's markdown: title, optional preamble, the stage table, then each section."""
    parts = [f"# {title}", ""]
    if preamble:
        parts += [preamble.strip(), ""]
    parts += ["## Stages", "", markdown_table(["stage", "status", "time"], stage_rows), ""]
    for section in sections:
        parts += [f"## {section.title}", "", section.body.strip(), ""]
    return "\n".join(parts)


def write_report(path: Path, title: str, stage_rows: Sequence[Sequence[Any]], sections: Sequence[Section],
                 preamble: Optional[str] = None) -> Path:
    """Write :func:`render_report` to ``path`` (parent directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(title, stage_rows, sections, preamble), encoding="utf-8")
    return path
