"""Loading a .nemo for inference, with clear errors, and the model's own decoding defaults.

Decoding defaults live in the .nemo's config, section ``inference`` (written by calibration)::

    inference:
      exit_policy: max_prob
      exit_thresholds: {2: 0.83, 4: 0.71}   # exit layer -> threshold
      calibration: {...}                     # how they were chosen (target, prompts, tokens)
"""
from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path
from typing import Any, Optional

from nemo_ee.inference.policies import POLICIES, check_threshold

WEIGHTS = "model_weights.safetensors"
CONFIG = "model_config.yaml"


class CheckpointError(ValueError):
    """A .nemo that cannot be used: not a .nemo, truncated, or weights that do not fit its config."""


def _member(names: list[str], leaf: str) -> Optional[str]:
    return next((n for n in names if n == leaf or n.endswith("/" + leaf)), None)


def check_nemo_file(path: str | Path) -> None:
    """Fail fast on a missing, non-tar, truncated or incomplete .nemo before any model is built."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .nemo file at {path}")
    if not tarfile.is_tarfile(path):
        raise CheckpointError(f"{path} is not a .nemo archive (a tar file with {CONFIG} and {WEIGHTS})")
    try:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            missing = [leaf for leaf in (CONFIG, WEIGHTS) if _member(names, leaf) is None]
            if missing:
                raise CheckpointError(f"{path} lacks {missing}; it was not written by nemo_ee (found {names[:6]})")
            member = tar.getmember(_member(names, WEIGHTS))
            with tar.extractfile(member) as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > member.size - 8:
                    raise CheckpointError(f"{path}: {WEIGHTS} is truncated or corrupt (header of {header_len} bytes)")
                header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > member.size:
                raise CheckpointError(f"{path}: {WEIGHTS} is truncated ({member.size} bytes, needs {8 + header_len + end})")
    except (tarfile.TarError, EOFError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: {err}") from None


def load_nemo_for_inference(path: str | Path) -> Any:
    """Restore an EarlyExitGPTNeMoModel in eval mode (single process, TP=PP=1) or raise a clear error."""
    import torch

    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel
    from nemo_ee.parallel.initialize import initialize_distributed

    check_nemo_file(path)
    if not torch.distributed.is_initialized():
        initialize_distributed(1, 1, seed=0)
    try:
        model = EarlyExitGPTNeMoModel.restore_from(str(path), map_location="cpu")
    except RuntimeError as err:  # load_state_dict: missing / unexpected keys, shape mismatches
        raise CheckpointError(f"{path}: the weights do not match the model its config describes: {err}") from None
    model.eval()
    model.model.eval()
    inference_defaults(model.cfg)  # a broken inference section is an error now, not at the first request
    return model


def inference_defaults(cfg: Any) -> dict:
    """GenerationParams fields from the config's ``inference`` section ({} when there is none)."""
    section = cfg.get("inference") if cfg is not None else None
    if not section:
        return {}
    policy = str(section.get("exit_policy", "max_prob"))
    if policy not in POLICIES:
        raise CheckpointError(f"inference.exit_policy {policy!r} is not one of {list(POLICIES)}")
    out: dict = {"exit_policy": policy}
    thresholds = section.get("exit_thresholds")
    if thresholds:
        out["exit_thresholds"] = {int(k): check_threshold(policy, v) for k, v in dict(thresholds).items()}
    if section.get("threshold") is not None:
        out["threshold"] = check_threshold(policy, section.get("threshold"))
    vocab = section.get("exit_vocab")
    if vocab is not None:
        ids = [int(t) for t in vocab]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
            raise CheckpointError(f"inference.exit_vocab must be distinct token ids >= 0 ({len(ids)} given)")
        out["exit_vocab"] = tuple(sorted(ids))
    spec = section.get("self_speculative")
    if spec:
        for key, kind in (("draft_exit", int), ("num_draft", int), ("draft_threshold", float)):
            value = spec.get(key)
            if value is not None:
                try:
                    out[key] = kind(value)
                except (TypeError, ValueError):
                    raise CheckpointError(f"inference.self_speculative.{key}={value!r} is not a number") from None
        if out.get("num_draft", 1) < 1 or not 0.0 <= out.get("draft_threshold", 0.0) <= 1.0:
            raise CheckpointError(f"inference.self_speculative {dict(spec)} needs num_draft >= 1 and a "
                                  "draft_threshold in 0..1")
    return out
