"""What a pipeline stage is: its declaration, what it receives, what it returns, and its done-marker on disk.

A stage lives in ``<run_dir>/<stage name>/``; ``stage.json`` there records the config hash it ran with,
its status (``running`` / ``done``), its artefacts (paths and numbers, JSON) and the report sections it
contributed, so a rerun can skip it and still rebuild the whole report.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from nemo_ee.atomic import atomic_path
from nemo_ee.pipeline.report import Section

MARKER = "stage.json"
COMMON_KEYS = ("skip", "rerun")  # every stage takes these


@dataclass
class StageContext:
    """Everything a stage function may read: the whole config, its own section, and its inputs' artefacts."""

    cfg: DictConfig
    stage_cfg: DictConfig
    run_dir: Path
    stage_dir: Path
    inputs: dict[str, dict]  # upstream stage name -> its artefacts (only the stages that produced some)


@dataclass
class StageResult:
    """A stage's output: JSON-able artefacts (paths as strings, numbers) and its report sections."""

    artefacts: dict[str, Any]
    sections: list[Section] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, declared in :data:`nemo_ee.pipeline.stages.STAGES`.

    ``needs``: upstream stages whose artefacts ``run`` requires (if one is skipped, so is this stage);
    ``wants``: upstream stages used when present (``needs_any``: at least one of them must be);
    ``pointer``: the artefact key a user may set (``stages.<name>.<pointer>=path``) instead of running it;
    ``keys``: its own config keys besides ``skip`` / ``rerun`` / ``pointer`` (None: any key);
    ``settings``: what its config hash covers; ``check``: validation of its settings before any work;
    ``resumable``: it keeps partial state (checkpoints), so a changed config needs ``rerun=true``.
    """

    name: str
    title: str
    run: Callable[[StageContext], StageResult]
    settings: Callable[[DictConfig], Any]
    needs: tuple[str, ...] = ()
    wants: tuple[str, ...] = ()
    needs_any: bool = False
    pointer: Optional[str] = None
    keys: Optional[frozenset] = frozenset()
    check: Optional[Callable[[DictConfig, dict], None]] = None
    resumable: bool = False

    def allowed_keys(self) -> Optional[set]:
        """The keys ``stages.<name>`` may hold; None when the stage takes a whole recipe section."""
        if self.keys is None:
            return None
        return set(COMMON_KEYS) | set(self.keys) | ({self.pointer} if self.pointer else set())


def config_hash(payload: Any) -> str:
    """A short, stable hash of JSON-able settings (sorted keys): what a done-marker is checked against."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_identity(path: Path) -> dict:
    """A given artefact's identity for downstream hashes: resolved path, size and modification time."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (nemo_ee.atomic): a killed run never leaves half a marker."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def read_marker(stage_dir: Path) -> Optional[dict]:
    """The stage's ``stage.json``, or None when there is none (or it is unreadable: the stage reruns)."""
    path = stage_dir / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_marker(stage_dir: Path, stage: str, hash_: str, status: str, result: Optional[StageResult] = None,
                 elapsed: Optional[float] = None) -> None:
    """Record a stage as ``running`` (before it starts) or ``done`` (with its artefacts and sections)."""
    data: dict[str, Any] = {"stage": stage, "hash": hash_, "status": status,
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if result is not None:
        data["artefacts"] = result.artefacts
        data["sections"] = [s.to_dict() for s in result.sections]
    if elapsed is not None:
        data["elapsed_s"] = round(float(elapsed), 2)
    write_json(stage_dir / MARKER, data)


def artefact_paths_exist(artefacts: dict) -> bool:
    """True when every artefact that names a file (``nemo``, ``*_file``, ``*_json``, ``*_png``) still exists."""
    for key, value in artefacts.items():
        is_path = key == "nemo" or key.endswith(("_file", "_json", "_png"))
        if is_path and isinstance(value, str) and not Path(value).exists():
            return False
    return True


def format_seconds(seconds: float) -> str:
    """``1h02m03s`` / ``4m05s`` / ``6.2s``: stage headers and the report's timing column."""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def plain_dict(cfg: DictConfig) -> dict:
    """A config node as plain containers, interpolations resolved (``???`` kept)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def positive_ints(section: str, values: dict, keys: tuple) -> None:
    """A clear error naming ``stages.<section>.<key>`` for the first of ``keys`` that is not an integer >= 1."""
    for key in keys:
        value = values.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"stages.{section}.{key}={value!r} must be an integer >= 1")


def nemo_arch(path: str) -> dict:
    """The ``arch`` section of a .nemo's config, read from the archive without loading weights."""
    from nemo_ee.tuning.add_exits import read_nemo_config

    return plain_dict(read_nemo_config(path).arch)


def remove_stage_dir(stage_dir: Path) -> None:
    """Discard a stage's old outputs (``rerun=true`` or a changed config of a stage that cannot resume)."""
    if stage_dir.is_dir():
        shutil.rmtree(stage_dir)
