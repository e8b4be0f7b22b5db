"""Corpus listing, exclusions, deterministic file split and fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from nemo_ee.data import CorpusSpec, corpus_fingerprint, iter_texts, list_corpus_files, split_files


def _write(root: Path, rel: str, data: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _rels(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root.resolve()).as_posix() for p in paths]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for i in range(40):
        _write(tmp_path, f"pkg{i % 4}/mod_{i:02d}.py", f"x = {i}\n" * (i + 1))
    _write(tmp_path, "tests/test_a.py", "assert 1\n")
    _write(tmp_path, "pkg0/test/test_b.py", "assert 1\n")
    _write(tmp_path, "site-packages/third.py", "y = 1\n")
    _write(tmp_path, "__pycache__/cached.py", "z = 1\n")
    _write(tmp_path, "latin1.py", b"s = '\xe9'\n")
    _write(tmp_path, "notes.txt", "not python\n")
    return tmp_path


def test_stdlib_default_has_known_files_and_no_tests_or_site_packages() -> None:
    spec = CorpusSpec()
    rels = _rels(list_corpus_files(spec), spec.root_path)
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= set(rels)
    assert rels == sorted(rels)
    assert not [r for r in rels if r.startswith(("test/", "site-packages/")) or "/tests/" in r]
    assert len(rels) > 300


def test_stdlib_split_is_deterministic_disjoint_and_about_five_percent() -> None:
    spec = CorpusSpec()
    train, val = split_files(spec)
    assert (train, val) == split_files(spec)
    assert not set(train) & set(val)
    assert sorted(train + val, key=str) == sorted(list_corpus_files(spec), key=str)
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.10


def test_listing_excludes_dirs_non_utf8_and_non_py(tree: Path) -> None:
    rels = _rels(list_corpus_files(CorpusSpec(root=str(tree))), tree)
    assert rels == sorted(f"pkg{i % 4}/mod_{i:02d}.py" for i in range(40))


def test_split_follows_path_hash_rule(tree: Path) -> None:
    spec = CorpusSpec(root=str(tree), val_fraction=0.3)
    train, val = split_files(spec)
    expected_val = [
        r for r in _rels(list_corpus_files(spec), tree)
        if int(hashlib.sha1(r.encode()).hexdigest(), 16) % 1000 < 300
    ]
    assert _rels(val, tree) == expected_val
    assert len(train) + len(val) == 40 and train and val


def test_split_of_a_file_does_not_depend_on_other_files(tree: Path) -> None:
    _, val_before = split_files(CorpusSpec(root=str(tree), val_fraction=0.3))
    _write(tree, "pkg9/extra.py", "pass\n")
    _, val_after = split_files(CorpusSpec(root=str(tree), val_fraction=0.3))
    assert set(_rels(val_before, tree)) <= set(_rels(val_after, tree))


def test_tiny_val_fraction_still_gives_non_empty_splits(tmp_path: Path) -> None:
    _write(tmp_path, "a.py", "a = 1\n")
    _write(tmp_path, "b.py", "b = 1\n")
    train, val = split_files(CorpusSpec(root=str(tmp_path), val_fraction=0.0001))
    assert _rels(train, tmp_path) == ["a.py"] and _rels(val, tmp_path) == ["b.py"]
    train, val = split_files(CorpusSpec(root=str(tmp_path), val_fraction=0.9999))
    assert len(train) == 1 and len(val) == 1


def test_max_files_and_max_bytes_take_sorted_prefix(tree: Path) -> None:
    all_files = list_corpus_files(CorpusSpec(root=str(tree)))
    assert list_corpus_files(CorpusSpec(root=str(tree), max_files=5)) == all_files[:5]
    sizes = [p.stat().st_size for p in all_files]
    budget = sum(sizes[:7])
    assert list_corpus_files(CorpusSpec(root=str(tree), max_bytes=budget)) == all_files[:7]
    assert list_corpus_files(CorpusSpec(root=str(tree), max_bytes=budget - 1)) == all_files[:6]
    assert len(list_corpus_files(CorpusSpec(max_files=3))) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 1.5}, r"val_fraction 1\.5 is outside \(0, 1\)"),
        ({"val_fraction": 0.0}, r"val_fraction 0\.0 is outside \(0, 1\)"),
        ({"max_files": 0}, r"max_files 0 must be None or an integer >= 1"),
        ({"max_bytes": -5}, r"max_bytes -5 must be None or an integer >= 1"),
        ({"root": "/definitely/not/here"}, r"/definitely/not/here"),
    ],
)
def test_bad_spec_values_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CorpusSpec(**kwargs)


def test_iter_texts_is_byte_exact(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.py", "x = 'é'\r\ny = 2\n")
    b = _write(tmp_path, "b.py", "")
    assert list(iter_texts([a, b])) == ["x = 'é'\r\ny = 2\n", ""]


def test_fingerprint_is_stable_and_tracks_files_sizes_and_split(tree: Path) -> None:
    spec = CorpusSpec(root=str(tree))
    fp = corpus_fingerprint(spec)
    assert fp == corpus_fingerprint(CorpusSpec(root=str(tree))) and len(fp) == 16
    assert corpus_fingerprint(CorpusSpec(root=str(tree), val_fraction=0.2)) != fp
    assert corpus_fingerprint(CorpusSpec(root=str(tree), max_files=10)) != fp
    (tree / "pkg0/mod_00.py").write_text("x = 0\n# grown\n")
    assert corpus_fingerprint(spec) != fp
