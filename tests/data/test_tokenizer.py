"""Byte-level BPE training, caching, special ids and exact round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

import nemo_ee.data.tokenizer as tokmod
from nemo_ee.data import (
    CorpusSpec,
    EETokenizer,
    corpus_fingerprint,
    iter_texts,
    split_files,
    train_tokenizer,
)

SPEC = CorpusSpec(max_files=80)  # a ~1.5 MB sorted prefix of the stdlib
VOCAB = 2000


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(SPEC, VOCAB, tmp_path_factory.mktemp("tok"))


def test_cache_file_name_special_ids_and_vocab_size(trained: Path) -> None:
    assert trained.name == f"tokenizer-{corpus_fingerprint(SPEC)}-{VOCAB}.json"
    tok = EETokenizer.from_file(trained)
    assert tok.path == trained
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.vocab_size == VOCAB
    assert tok.encode("<|endoftext|><|pad|>") == [0, 1]
    assert not list(trained.parent.glob("*.tmp"))


def test_round_trip_is_exact_on_train_and_val_files(trained: Path) -> None:
    tok = EETokenizer.from_file(trained)
    train, val = split_files(SPEC)
    files = train[:4] + val[:2] + [SPEC.root_path / "os.py"]
    n_ids = n_bytes = 0
    for path, text in zip(files, iter_texts(files)):
        ids = tok.encode(text)
        assert tok.decode(ids) == text, path
        n_ids, n_bytes = n_ids + len(ids), n_bytes + len(text.encode("utf-8"))
    assert n_ids < n_bytes / 2.5, "a 2000-token BPE should compress source code well"


def test_round_trip_unicode_and_crlf(trained: Path) -> None:
    tok = EETokenizer.from_file(trained)
    text = "# ünïcödé 漢字 🐍\r\ndef f(x):\r\n\treturn x  # tab\n\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "pass"]) == [tok.encode(text), tok.encode("pass")]
    assert tok.decode([tok.eos_id], skip_special_tokens=True) == ""


def test_second_call_reuses_cache_without_training(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mtime = trained.stat().st_mtime_ns

    def no_training(*args: object) -> None:
        raise AssertionError("train_tokenizer retrained despite a cached file")

    monkeypatch.setattr(tokmod, "_train", no_training)
    assert train_tokenizer(SPEC, VOCAB, trained.parent) == trained
    assert trained.stat().st_mtime_ns == mtime


def test_save_writes_loadable_identical_tokenizer(trained: Path, tmp_path: Path) -> None:
    tok = EETokenizer.from_file(trained)
    out = tok.save(tmp_path / "sub" / "copy.json")
    assert out == tmp_path / "sub" / "copy.json" and tok.path == out
    copy = EETokenizer.from_file(out)
    sample = "import os\nprint(os.getcwd())\n"
    assert copy.encode(sample) == tok.encode(sample)
    assert copy.fingerprint == tok.fingerprint


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        EETokenizer.from_file(tmp_path / "nope.json")


@pytest.mark.parametrize("vocab", [0, 257, 1_000_001])
def test_bad_vocab_size_raises(vocab: int, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"vocab_size {vocab} is outside \[258, 1000000\]"):
        train_tokenizer(SPEC, vocab, tmp_path)
    assert not list(tmp_path.iterdir())


def test_minimum_vocab_is_pure_bytes(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("print('hi')\n" * 20)
    (tmp_path / "b.py").write_text("x = 1\n" * 20)
    path = train_tokenizer(CorpusSpec(root=str(tmp_path)), 258, tmp_path / "cache")
    tok = EETokenizer.from_file(path)
    assert tok.vocab_size == 258
    text = "x = 'é'\n"
    assert len(tok.encode(text)) == len(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
