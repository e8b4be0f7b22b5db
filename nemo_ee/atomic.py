"""Atomic file writes: write beside the target, then ``os.replace``; a killed write never leaves half a file."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(dst: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success it replaces ``dst``, on any error it is removed.

    ``suffix`` keeps an extension a writer insists on (NeMo's ``save_to`` wants ``.nemo``). The writer may
    make the path a folder (``dst`` must then not exist yet: a folder cannot replace a folder).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}{suffix}")
    _remove(tmp)  # left by a killed writer of the same pid
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_nemo(model: Any, path: str | Path) -> Path:
    """``model.save_to(path)`` atomically."""
    with atomic_path(path, suffix=".nemo") as tmp:
        model.save_to(str(tmp))
    return Path(path)
