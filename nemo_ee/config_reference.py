"""The configuration reference, generated from the config dataclasses (never hand-copied).

Each field's type and default come from ``dataclasses.fields``; its description is the comment on
its line in the source, and ``# ---- title ----`` comments open sections. ``docs/config_reference.md``
is the rendered result; a test keeps it current (``python scripts/gen_config_reference.py``).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

# (recipe location, dataclass import path)
SOURCES = (
    ("`model.arch` (recipes in conf/)", "nemo_ee.config:EarlyExitConfig"),
    ("`model.optim` (recipes in conf/)", "nemo_ee.parallel.optimizer:OptimSettings"),
    ("per request (generate.py, Triton inputs)", "nemo_ee.inference.generate:GenerationParams"),
)
_SECTION = re.compile(r"#\s*-{2,}\s*(.+?)\s*-{2,}")
_FIELD = re.compile(r"^\s{4}(\w+)\s*:\s*[^#]*?(?:#\s*(.*))?$")


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(__import__(module, fromlist=[name]), name)


def _type_name(tp: Any) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    text = text.replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"<class '(\w+)'>", r"\1", text)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def _comments(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """({field: its inline comment}, {field: the section title above it})."""
    comments, sections, current = {}, {}, ""
    for line in inspect.getsource(cls).splitlines():
        section = _SECTION.search(line)
        if section and line.strip().startswith("#"):
            current = section.group(1).strip()
            continue
        match = _FIELD.match(line)
        if match and not line.strip().startswith(("def ", "return", "#")):
            comments[match.group(1)] = (match.group(2) or "").strip()
            sections[match.group(1)] = current
    return comments, sections


def render_class(where: str, cls: type) -> str:
    """One markdown section: a table of the dataclass's fields."""
    hints = typing.get_type_hints(cls)
    comments, sections = _comments(cls)
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"## {cls.__name__} — {where}", "", doc, ""]
    current: Any = object()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if sections.get(f.name, "") != current:
            current = sections.get(f.name, "")
            lines += (["", f"**{current}**", ""] if current else []) + ["| field | type | default | meaning |",
                                                                  "|---|---|---|---|"]
        meaning = comments.get(f.name, "").replace("|", "\\|")
        kind = _type_name(hints.get(f.name, f.type)).replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{kind}` | `{_default(f)}` | {meaning} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole reference document."""
    head = ("# Configuration reference\n\nGenerated from the config dataclasses by "
            "`python scripts/gen_config_reference.py`; do not edit by hand. Every value is validated when "
            "the dataclass is built, before any work starts.\n")
    return "\n".join([head] + [render_class(where, _load(path)) for where, path in SOURCES])
