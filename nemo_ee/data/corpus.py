"""The embedded default corpus: Python source files, by default CPython's own stdlib.

Files are listed in sorted relative-POSIX-path order and split into train/validation
*by file* with a hash of the relative path, so a file's split does not depend on which
other files exist (adding or removing files never moves an existing file between splits).

Excluded directories (pruned anywhere in the tree):
- ``site-packages`` / ``dist-packages``: third-party code, not part of the stdlib, and
  it differs from one machine to the next.
- ``test`` / ``tests`` / ``idle_test``: CPython's test suites are huge, very repetitive,
  and ``lib2to3/tests/data`` deliberately holds Python 2 and malformed sources.
- ``__pycache__`` and hidden directories (``.git`` etc.).
``idlelib`` and ``lib2to3`` themselves are ordinary library code and are kept.
Files that are not valid UTF-8 are skipped.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


@dataclass(frozen=True)
class CorpusSpec:
    """Which files make up the corpus and how they are split; validated on construction."""

    root: str | None = None  # None -> the running interpreter's stdlib directory
    val_fraction: float = 0.05  # share of files (by path hash) held out for validation
    max_files: int | None = None  # keep only the first N files in sorted order
    max_bytes: int | None = None  # keep the longest sorted prefix whose total size fits

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction} is outside (0, 1)")
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            bad_type = isinstance(value, bool) or not isinstance(value, int)
            if value is not None and (bad_type or value < 1):
                raise ValueError(f"{name} {value!r} must be None or an integer >= 1")
        if self.root is not None and not Path(self.root).is_dir():
            raise ValueError(f"corpus root {self.root!r} does not exist or is not a directory")

    @property
    def root_path(self) -> Path:
        """The resolved corpus root directory (stdlib when ``root`` is None)."""
        root = self.root if self.root is not None else sysconfig.get_paths()["stdlib"]
        return Path(root).resolve()


def _relpath(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def list_corpus_files(spec: CorpusSpec) -> list[Path]:
    """All corpus ``.py`` files, sorted by relative POSIX path, after the size limits."""
    root = spec.root_path
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    found.sort(key=lambda p: _relpath(p, root))
    files: list[Path] = []
    total = 0
    for path in found:
        if spec.max_files is not None and len(files) >= spec.max_files:
            break
        if not path.is_file() or not _is_utf8(path):
            continue
        size = path.stat().st_size
        if spec.max_bytes is not None and total + size > spec.max_bytes:
            break
        files.append(path)
        total += size
    return files


def _is_val(relpath: str, val_permille: int) -> bool:
    digest = hashlib.sha1(relpath.encode("utf-8")).hexdigest()
    return int(digest, 16) % 1000 < val_permille


def split_files(spec: CorpusSpec) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, val) split by file; both non-empty when there are >= 2 files."""
    root = spec.root_path
    permille = round(spec.val_fraction * 1000)
    train: list[Path] = []
    val: list[Path] = []
    for path in list_corpus_files(spec):
        (val if _is_val(_relpath(path, root), permille) else train).append(path)
    if len(train) + len(val) >= 2:
        if not val:
            val.append(train.pop())
        elif not train:
            train.append(val.pop(0))
    return train, val


def iter_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Yield each file's exact text (bytes decoded as UTF-8, line endings untouched)."""
    for path in paths:
        yield Path(path).read_bytes().decode("utf-8")


def corpus_fingerprint(spec: CorpusSpec) -> str:
    """Short sha1 over relative paths, sizes and the split rule; used in cache file names."""
    root = spec.root_path
    h = hashlib.sha1(f"split-v1:{round(spec.val_fraction * 1000)}\n".encode())
    for path in list_corpus_files(spec):
        h.update(f"{_relpath(path, root)}\0{path.stat().st_size}\n".encode("utf-8"))
    return h.hexdigest()[:16]
