"""Walk the stage list: validate the whole config first, then run, reuse, take as given, or skip each stage.

A stage is reused when its ``stage.json`` says ``done`` with the same config hash (its settings plus its
inputs' hashes) and its files still exist. A changed config reruns a stage from scratch, except a
``resumable`` one (pretraining keeps checkpoints that a changed recipe must not resume): that is an
error before any work unless ``stages.<name>.rerun=true``. An interrupted stage (marker ``running``, same
hash) runs again; pretraining then resumes from its last checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from nemo_ee.pipeline.base import (
    Stage, StageContext, StageResult, artefact_paths_exist, config_hash, file_identity, format_seconds,
    read_marker, remove_stage_dir, write_json, write_marker,
)
from nemo_ee.pipeline.report import Section, write_report
from nemo_ee.pipeline.stages import STAGES

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class PlannedStage:
    """What the runner will do with one stage: ``run``, ``reuse`` (done earlier), ``given`` or ``skip``."""

    stage: Stage
    action: str
    reason: str = ""
    hash: Optional[str] = None
    artefacts: Optional[dict] = None
    fresh: bool = False  # remove the stage directory before running
    marker: Optional[dict] = None


def load_config(overrides: Sequence[str] = (), config_name: str = "pipeline_tiny") -> DictConfig:
    """The pipeline config composed by Hydra from ``conf/`` with command-line style overrides (tests, notebooks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def run_dir(cfg: DictConfig) -> Path:
    """``<out_dir>/<name>``: where every stage, the report and its plots go."""
    return Path(str(cfg.out_dir)) / str(cfg.name)


def _validate_sections(cfg: DictConfig, stages: Sequence[Stage], errors: list[str]) -> dict[str, str]:
    """Stage names, keys, flags and artefact paths; returns {stage: given artefact path}."""
    from nemo_ee.tuning.add_exits import read_nemo_config

    name = cfg.get("name")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        errors.append(f"name={name!r} must be a non-empty run name without '/'")
    names = [s.name for s in stages]
    section = cfg.get("stages") or {}
    unknown = sorted(set(section) - set(names))
    if unknown:
        errors.append(f"unknown stage(s) {unknown}; the stages are {names}")
    given: dict[str, str] = {}
    for stage in stages:
        scfg = section.get(stage.name)
        if scfg is None:
            errors.append(f"stages.{stage.name} is missing from the config")
            continue
        allowed = stage.allowed_keys()
        extra = sorted(set(scfg) - allowed) if allowed is not None else []
        if extra:
            errors.append(f"stages.{stage.name}: unknown key(s) {extra}; allowed: {sorted(allowed)}")
        for flag in ("skip", "rerun"):
            if not isinstance(scfg.get(flag, False), bool):
                errors.append(f"stages.{stage.name}.{flag}={scfg.get(flag)!r} must be true or false")
        path = scfg.get(stage.pointer) if stage.pointer else None
        if path is None:
            continue
        where = f"stages.{stage.name}.{stage.pointer}={path}"
        path = Path(str(path))
        if scfg.get("skip", False):
            errors.append(f"{where} and stages.{stage.name}.skip=true: choose one")
        elif path.suffix != ".nemo":
            errors.append(f"{where}: not a .nemo file")
        elif not path.is_file():
            errors.append(f"{where}: no such file")
        else:
            try:
                read_nemo_config(path)
            except Exception as exc:  # noqa: BLE001 - any unreadable archive is a bad path
                errors.append(f"{where}: not a readable .nemo ({exc})")
            else:
                given[stage.name] = str(path)
    return given


def plan_pipeline(cfg: DictConfig, stages: Sequence[Stage] = STAGES) -> list[PlannedStage]:
    """Validate the config and decide each stage's action; ValueError listing every problem, before any work."""
    errors: list[str] = []
    given = _validate_sections(cfg, stages, errors)
    if errors:
        raise ValueError("invalid pipeline config:\n  - " + "\n  - ".join(errors))
    from nemo_ee.tuning.add_exits import read_nemo_config

    root = run_dir(cfg)
    plan: list[PlannedStage] = []
    hashes: dict[str, str] = {}  # stages that will have artefacts
    running: set[str] = set()  # stages that will run: what reads their outputs must not reuse older results
    for stage in stages:
        scfg = cfg.stages[stage.name]
        missing = [n for n in stage.needs if n not in hashes]
        present = [n for n in (*stage.needs, *stage.wants) if n in hashes]
        if scfg.get("skip", False):
            plan.append(PlannedStage(stage, "skip", "skip=true"))
            continue
        if stage.name in given:
            path = Path(given[stage.name])
            layers = list(read_nemo_config(path).arch.get("exit_layer_nums") or [])
            hashes[stage.name] = config_hash(file_identity(path))
            plan.append(PlannedStage(stage, "given", str(path), hashes[stage.name],
                                     {stage.pointer: str(path), "exit_layers": layers}))
            if stage.check is not None:
                _collect(errors, stage.check, cfg, given)
            continue
        if missing or (stage.needs_any and not present):
            wanted = missing or list(stage.wants)
            plan.append(PlannedStage(stage, "skip", f"needs {' or '.join(wanted)}, which is skipped"))
            continue
        if stage.check is not None and not _collect(errors, stage.check, cfg, given):
            continue
        try:
            payload = {"stage": stage.name, "settings": stage.settings(cfg), "inputs": {n: hashes[n] for n in present}}
        except Exception as exc:  # noqa: BLE001 - a setting that cannot even be read is a config error
            errors.append(f"stages.{stage.name}: {exc}")
            continue
        hashes[stage.name] = h = config_hash(payload)
        decision = _decide(stage, scfg, h, root / stage.name, errors)
        rerun_inputs = [n for n in present if n in running]
        if decision.action == "reuse" and rerun_inputs:
            decision = PlannedStage(stage, "run", f"{rerun_inputs[0]} runs again", h, fresh=not stage.resumable,
                                    marker=decision.marker)
        if decision.action == "run":
            running.add(stage.name)
        plan.append(decision)
    if errors:
        raise ValueError("invalid pipeline config:\n  - " + "\n  - ".join(errors))
    return plan


def _collect(errors: list[str], check: Any, cfg: DictConfig, given: dict) -> bool:
    try:
        check(cfg, given)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        errors.append(str(exc))
        return False
    return True


def _decide(stage: Stage, scfg: DictConfig, h: str, stage_dir: Path, errors: list[str]) -> PlannedStage:
    marker = read_marker(stage_dir)
    if scfg.get("rerun", False):
        return PlannedStage(stage, "run", "rerun=true", h, fresh=True, marker=marker)
    if marker is None:
        return PlannedStage(stage, "run", "not run yet", h, marker=marker)
    if marker.get("hash") == h:
        if marker.get("status") == "done" and artefact_paths_exist(marker.get("artefacts") or {}):
            return PlannedStage(stage, "reuse", "done earlier", h, marker.get("artefacts"), marker=marker)
        return PlannedStage(stage, "run", "interrupted earlier: resuming" if stage.resumable else "incomplete", h,
                            marker=marker)
    if stage.resumable:
        errors.append(f"stages.{stage.name}: {stage_dir} was made with another config (hash {marker.get('hash')}, "
                      f"now {h}) and its checkpoints would be resumed; set stages.{stage.name}.rerun=true to "
                      f"discard them and start over, or use another run name (name=...)")
    return PlannedStage(stage, "run", "config changed", h, fresh=True, marker=marker)


def _status(p: PlannedStage, elapsed: Optional[float]) -> list[Any]:
    text = {"run": "ran", "reuse": "done earlier, reused", "given": f"given: `{p.reason}`",
            "skip": f"skipped ({p.reason})", "failed": "FAILED"}[p.action]
    return [p.stage.name, text, format_seconds(elapsed) if elapsed is not None else "—"]


def run_pipeline(cfg: DictConfig, stages: Sequence[Stage] = STAGES) -> dict[str, Any]:
    """Run the pipeline the config describes; writes ``<run>/report.md`` and ``<run>/pipeline.json``.

    Returns {"run_dir", "report", "stages": [{"stage", "action", "reason", "elapsed_s"}], "wall_time_s"}.
    """
    plan = plan_pipeline(cfg, stages)
    root = run_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    artefacts: dict[str, dict] = {}
    sections: list[Section] = []
    rows, summary = [], []
    try:
        for i, p in enumerate(plan, 1):
            stage, stage_dir = p.stage, root / p.stage.name
            head = f"=== [{i}/{len(plan)}] {stage.name}: {stage.title}"
            elapsed: Optional[float] = None
            if p.action == "skip":
                print(f"\n{head} -- skipped ({p.reason})", flush=True)
            elif p.action == "given":
                print(f"\n{head} -- given: {p.reason}", flush=True)
                artefacts[stage.name] = p.artefacts
            elif p.action == "reuse":
                elapsed = (p.marker or {}).get("elapsed_s")
                print(f"\n{head} -- done earlier (config {p.hash}), skipped", flush=True)
                artefacts[stage.name] = p.artefacts
                sections += [Section.from_dict(s) for s in (p.marker or {}).get("sections", [])]
            else:
                print(f"\n{head} ({p.reason}; {format_seconds(time.time() - start)} into the run) ===", flush=True)
                if p.fresh:
                    remove_stage_dir(stage_dir)
                stage_dir.mkdir(parents=True, exist_ok=True)
                write_marker(stage_dir, stage.name, p.hash, "running")
                inputs = {n: artefacts[n] for n in (*stage.needs, *stage.wants) if n in artefacts}
                ctx = StageContext(cfg, cfg.stages[stage.name], root, stage_dir, inputs)
                t0 = time.time()
                try:
                    result: StageResult = stage.run(ctx)
                except BaseException:
                    p.action = "failed"
                    rows.append(_status(p, time.time() - t0))
                    summary.append({"stage": stage.name, "action": "failed", "reason": p.reason,
                                    "elapsed_s": round(time.time() - t0, 2)})
                    raise
                elapsed = time.time() - t0
                write_marker(stage_dir, stage.name, p.hash, "done", result, elapsed)
                artefacts[stage.name] = result.artefacts
                sections += result.sections
                print(f"--- {stage.name} done in {format_seconds(elapsed)} "
                      f"(run so far {format_seconds(time.time() - start)})", flush=True)
            rows.append(_status(p, elapsed))
            summary.append({"stage": stage.name, "action": p.action, "reason": p.reason, "hash": p.hash,
                            "elapsed_s": None if elapsed is None else round(float(elapsed), 2)})
    finally:
        wall = time.time() - start
        report = write_report(
            root / "report.md", f"nemo_ee pipeline: {cfg.name}", rows, sections,
            preamble=f"Written {time.strftime('%Y-%m-%d %H:%M %Z')}. This invocation took {format_seconds(wall)}; "
                     f"the table gives each stage's own time (a reused stage: the time it took when it ran).",
        )
        info = {"run_dir": str(root), "report": str(report), "stages": summary, "wall_time_s": round(wall, 2)}
        write_json(root / "pipeline.json", info)
    print(f"\npipeline {cfg.name} finished in {format_seconds(wall)}; report: {report}", flush=True)
    return info

