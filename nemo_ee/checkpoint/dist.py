"""Distributed (sharded) checkpoints of an :class:`EarlyExitGPTModel` stage, on megatron-core's ``dist_checkpointing``.

Every rank calls :func:`save_model` / :func:`load_model` with its own pipeline stage / tensor shard.
The checkpoint holds *global* tensors (megatron's ``ShardedTensor`` keys: ``decoder.layers.N`` with the
global layer number, ``exits.I`` with the global exit index), so a checkpoint saved at one TP/PP
layout loads into any other (``dist_checkpointing`` reshards on load).

Layout of a checkpoint folder::

    <dir>/metadata.json          megatron's format marker (backend torch_dist), written last
    <dir>/common.pt, .metadata, __<rank>_<i>.distcp   megatron / torch.distributed.checkpoint data
    <dir>/nemo_ee_config.json    the EarlyExitConfig (what :func:`read_config` returns)

Saves are atomic: everything is written into ``<dir>.tmp-<uuid>`` (same parent folder), then rank 0
swaps it in with renames; an interrupted save leaves the previous checkpoint as it was.

CPU note: megatron's own ``torch_dist`` writer forks a process per file bucket, collects results
through a spawned ``multiprocessing.Manager``, needs ``psutil`` (not installed here; its forked
writers die and the save hangs) and calls ``torch.cuda.synchronize()``. :func:`sync_save_strategy`
writes the same format (same key translation and save planner) in-process with torch's
``FileSystemWriter``, which works with gloo on CPU and on GPU alike; no async save. Loading uses
megatron's default ``torch_dist`` strategy, not the fully-parallel wrappers (they stage through CUDA).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Union

import torch.distributed as dist

from nemo_ee.config import EarlyExitConfig

# megatron is imported lazily (inside the functions that need it), so reading a checkpoint's config
# (``read_config``, ``is_checkpoint``; e.g. a script validating its arguments) stays fast.

__all__ = [
    "CONFIG_FILE",
    "CheckpointMismatchError",
    "is_checkpoint",
    "load_model",
    "read_config",
    "save_model",
    "sync_save_strategy",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CONFIG_FILE = "nemo_ee_config.json"
_MEGATRON_MARKER = "metadata.json"  # megatron writes it after every shard is on disk
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


class CheckpointMismatchError(RuntimeError):
    """The model's parameters and the checkpoint's tensors do not match (names listed)."""


def _megatron():
    """megatron's dist_checkpointing, with the CPU shim applied first (the models' tensors must be built on CPU)."""
    from nemo_ee.compat import cpu

    cpu.apply()
    from megatron.core import dist_checkpointing

    return dist_checkpointing


@functools.lru_cache(maxsize=None)
def _sync_strategy_class() -> type:
    _megatron()
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        """megatron's ``torch_dist`` format, written synchronously in this process.

        Same key translation and save planner as :class:`TorchDistSaveShardedStrategy`, but torch's own
        ``FileSystemWriter`` does the I/O instead of megatron's fork-per-bucket writer, so no helper
        process (and no ``psutil``) is needed and a killed save dies with its process.
        """

        def __init__(self) -> None:
            super().__init__("torch_dist", 1, thread_count=1)

        def save(self, sharded_state_dict: Any, checkpoint_dir: Path) -> None:
            from torch.distributed import checkpoint as dcp

            state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            pyt_state_dict = mcore_to_pyt_state_dict(state_dict, False)
            writer = dcp.FileSystemWriter(
                str(checkpoint_dir), single_file_per_rank=True, sync_files=True, thread_count=1
            )
            planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
            dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)

        def async_save(self, sharded_state_dict: Any, checkpoint_dir: Path):
            raise RuntimeError("SyncTorchDistSaveStrategy saves synchronously only: call save(), not async_save()")

    return SyncTorchDistSaveStrategy


def sync_save_strategy() -> Any:
    """A save strategy writing megatron's ``torch_dist`` format in-process (see the module docstring)."""
    return _sync_strategy_class()()


# ---------------------------------------------------------------------------------------- helpers
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast(value: Any) -> Any:
    """``value`` of rank 0 on every rank (picklable objects)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _siblings(ckpt_dir: Path, tag: str) -> list[Path]:
    parent = ckpt_dir.parent
    if not parent.is_dir():
        return []
    prefix = ckpt_dir.name + tag
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix))


def is_checkpoint(ckpt_dir: PathLike) -> bool:
    """Whether ``ckpt_dir`` holds a complete checkpoint written by :func:`save_model`."""
    path = Path(ckpt_dir)
    return (path / _MEGATRON_MARKER).is_file() and (path / CONFIG_FILE).is_file()


def _recover(ckpt_dir: Path) -> None:
    """Rank 0: finish a swap interrupted between its two renames (the old checkpoint set aside).

    A save renames ``<dir>`` to ``<dir>.old-<uuid>``, then ``<dir>.tmp-<uuid>`` to ``<dir>``. If the
    process died in between, ``<dir>`` is missing: put the complete new one in place if it is there,
    else the old one back.
    """
    if ckpt_dir.exists():
        for old in _siblings(ckpt_dir, _OLD_TAG):  # swap completed, only the clean-up was missed
            shutil.rmtree(old, ignore_errors=True)
        return
    olds = [p for p in _siblings(ckpt_dir, _OLD_TAG) if is_checkpoint(p)]
    if not olds:
        return
    token = olds[-1].name[len(ckpt_dir.name) + len(_OLD_TAG):]
    new = ckpt_dir.with_name(f"{ckpt_dir.name}{_TMP_TAG}{token}")
    source = new if is_checkpoint(new) else olds[-1]
    logger.warning("recovering checkpoint %s from %s (a previous save was interrupted)", ckpt_dir, source)
    os.rename(source, ckpt_dir)
    _fsync_dir(ckpt_dir.parent)


def _config_dict(model: Any) -> dict:
    cfg = getattr(model, "ee_config", None)
    if not isinstance(cfg, EarlyExitConfig):
        raise TypeError(f"{type(model).__name__} has no EarlyExitConfig (.ee_config); is it an EarlyExitGPTModel?")
    return cfg.to_dict()


def _unwrap(model: Any) -> Any:
    """The EarlyExitGPTModel inside megatron's DDP / Float16Module wrappers."""
    while not hasattr(model, "ee_config") and hasattr(model, "module"):
        model = model.module
    return model


def _sharded_state(model: Any, optimizer: Any = None, is_loading: bool = False) -> dict:
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        opt = getattr(optimizer, "optimizer", optimizer)  # MegatronOptimizerAdapter -> megatron optimizer
        state["optimizer"] = opt.sharded_state_dict(model_sd, is_loading=is_loading)
    return state


# ---------------------------------------------------------------------------------------- save
def save_model(model: Any, ckpt_dir: PathLike, optimizer: Any = None) -> Path:
    """Save this rank's stage of ``model`` (and, optionally, megatron ``optimizer`` state) to ``ckpt_dir``.

    Collective: every rank of the world calls it with the same ``ckpt_dir``. ``ckpt_dir`` is replaced
    atomically: the previous checkpoint there stays complete and loadable until the new one is.
    ``optimizer``: a megatron optimizer or :class:`~nemo_ee.parallel.optimizer.MegatronOptimizerAdapter`.
    Returns the checkpoint path.
    """
    model = _unwrap(model)
    config = _config_dict(model)
    ckpt_dir = Path(ckpt_dir).absolute()
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise NotADirectoryError(f"checkpoint path {ckpt_dir} exists and is not a directory")
    token = error = None
    if _rank() == 0:
        token = uuid.uuid4().hex[:12]
        try:
            ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
            _recover(ckpt_dir)
            for stale in _siblings(ckpt_dir, _TMP_TAG):  # left by saves that were killed
                shutil.rmtree(stale, ignore_errors=True)
            ckpt_dir.with_name(f"{ckpt_dir.name}{_TMP_TAG}{token}").mkdir()
        except OSError as exc:  # tell the other ranks instead of leaving them waiting in a collective
            error = f"cannot prepare checkpoint folder {ckpt_dir}: {exc}"
    token, error = _broadcast((token, error))
    if error:
        raise OSError(error)
    tmp = ckpt_dir.with_name(f"{ckpt_dir.name}{_TMP_TAG}{token}")

    _megatron().save(
        _sharded_state(model, optimizer), str(tmp), sharded_strategy=sync_save_strategy(),
        validate_access_integrity=True,
    )  # ends with a barrier after metadata.json: every shard of every rank is on disk
    if _rank() == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _swap_in(tmp, ckpt_dir, token)
    _barrier()
    return ckpt_dir


def _swap_in(tmp: Path, ckpt_dir: Path, token: str) -> None:
    """Rank 0: replace ``ckpt_dir`` by the complete ``tmp`` (old one set aside, then removed)."""
    _fsync_dir(tmp)
    old = None
    if ckpt_dir.exists():
        old = ckpt_dir.with_name(f"{ckpt_dir.name}{_OLD_TAG}{token}")
        os.rename(ckpt_dir, old)
    os.rename(tmp, ckpt_dir)
    _fsync_dir(ckpt_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------- load
def _check_readable(ckpt_dir: Path) -> None:
    if _rank() == 0:
        _recover(ckpt_dir)
    _barrier()
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} does not exist")
    if not (ckpt_dir / _MEGATRON_MARKER).is_file():
        raise FileNotFoundError(
            f"{ckpt_dir} is not a complete distributed checkpoint (no {_MEGATRON_MARKER}; an interrupted save?)"
        )


def _format_keys(keys: Any, limit: int = 20) -> str:
    names = sorted({getattr(k, "key", k) if not isinstance(k, str) else k for k in keys})
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_model(model: Any, ckpt_dir: PathLike, optimizer: Any = None, strict: bool = True) -> None:
    """Load ``ckpt_dir`` (saved at any TP/PP layout) into this rank's stage of ``model``.

    Collective: every rank calls it. ``strict``: raise :class:`CheckpointMismatchError` naming the keys
    when the model expects tensors the checkpoint lacks or the checkpoint has model tensors the model
    does not (optimizer tensors in the checkpoint are ignored unless ``optimizer`` is given), and when
    the checkpoint's exits sit at other layers (``exit_layer_nums`` / ``exit_position``: same keys).
    """
    model = _unwrap(model)
    ckpt_dir = Path(ckpt_dir).absolute()
    _check_readable(ckpt_dir)
    request = _sharded_state(model, optimizer, is_loading=True)
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, ckpt_only, model_only = _megatron().load(
        request, str(ckpt_dir), strict=StrictHandling.RETURN_ALL, validate_access_integrity=True
    )
    # megatron's names: "missing" = in the checkpoint, not requested (same on every rank);
    # "unexpected" = requested, not in the checkpoint (per rank: gathered so every rank raises alike).
    ckpt_only = {k for k in map(_key, ckpt_only) if optimizer is not None or not k.startswith("optimizer.")}
    model_only = set(map(_key, model_only))
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(model_only))
        model_only = {k for keys in gathered for k in keys}
    parts = _exit_placement_diffs(model, ckpt_dir)
    if strict and (ckpt_only or model_only or parts):
        if model_only:
            parts.append(f"the model expects {len(model_only)} tensor(s) missing from the checkpoint: "
                         f"{_format_keys(model_only)}")
        if ckpt_only:
            parts.append(f"the checkpoint has {len(ckpt_only)} tensor(s) the model does not: "
                         f"{_format_keys(ckpt_only)}")
        raise CheckpointMismatchError(f"checkpoint {ckpt_dir} does not match the model: " + "; ".join(parts))
    result = model.load_state_dict(loaded["model"], strict=strict)
    if strict and (result.missing_keys or result.unexpected_keys):  # pragma: no cover - guarded above
        raise CheckpointMismatchError(
            f"checkpoint {ckpt_dir}: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    if optimizer is not None:
        opt = getattr(optimizer, "optimizer", optimizer)
        opt.load_state_dict(loaded["optimizer"])


# Fields that change what an exit computes without changing any tensor name or shape.
_PLACEMENT_FIELDS = ("exit_layer_nums", "exit_position")


def _exit_placement_diffs(model: Any, ckpt_dir: Path) -> list[str]:
    """Exits are keyed by index, so an exit moved to another layer would load silently: name such moves."""
    path = ckpt_dir / CONFIG_FILE
    cfg = getattr(model, "ee_config", None)
    if not path.is_file() or cfg is None:
        return []
    saved = json.loads(path.read_text())
    return [f"the exits sit elsewhere ({name}: checkpoint {saved[name]!r}, model {getattr(cfg, name)!r})"
            for name in _PLACEMENT_FIELDS if name in saved and saved[name] != getattr(cfg, name)]


def _key(item: Any) -> str:
    """A mismatch entry's key with megatron's section prefix kept (``model.decoder...``)."""
    return item if isinstance(item, str) else getattr(item, "key", str(item))


# ---------------------------------------------------------------------------------------- config
def read_config(ckpt_dir: PathLike, **overrides: Any) -> EarlyExitConfig:
    """The EarlyExitConfig stored with a checkpoint; ``overrides`` (e.g. a new TP/PP layout) replace fields.

    Aliases: ``tp`` / ``pp`` for ``tensor_model_parallel_size`` / ``pipeline_model_parallel_size``.
    """
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not a nemo_ee distributed checkpoint")
    values = json.loads(path.read_text())
    aliases = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size"}
    for name, value in overrides.items():
        if value is not None:
            values[aliases.get(name, name)] = value
    if values.get("tensor_model_parallel_size") == 1:
        values["sequence_parallel"] = False  # needs TP > 1; a layout change must not make it invalid
    return EarlyExitConfig.from_dict(values)

