"""Tokenized corpus cache and next-token window datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nemo_ee.data import (
    CorpusSpec,
    EETokenizer,
    TokenWindowDataset,
    build_datasets,
    corpus_fingerprint,
    split_files,
    token_dtype,
    tokenize_corpus,
    train_tokenizer,
)


@pytest.fixture
def corpus(tmp_path: Path) -> CorpusSpec:
    root = tmp_path / "src"
    for i in range(12):
        body = "".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(30))
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"m{i:02d}.py").write_text(body)
    return CorpusSpec(root=str(root), val_fraction=0.2)


@pytest.fixture
def tok(corpus: CorpusSpec, tmp_path: Path) -> EETokenizer:
    return EETokenizer.from_file(train_tokenizer(corpus, 400, tmp_path / "cache"))


def test_windows_are_shifted_slices_of_the_raw_array() -> None:
    raw = np.arange(100, 123, dtype=np.uint16)  # 23 tokens
    ds = TokenWindowDataset(raw, seq_length=5)
    assert len(ds) == (23 - 1) // 5 == 4
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"].dtype == torch.int64 and s["tokens"].shape == (5,)
        assert s["tokens"].tolist() == raw[i * 5 : i * 5 + 5].tolist()
        assert s["labels"].tolist() == raw[i * 5 + 1 : i * 5 + 6].tolist()
        assert s["loss_mask"].dtype == torch.float32 and s["loss_mask"].tolist() == [1.0] * 5
        assert s["position_ids"].tolist() == [0, 1, 2, 3, 4]
    assert ds[-1]["tokens"].tolist() == ds[3]["tokens"].tolist()
    with pytest.raises(IndexError):
        ds[4]


def test_exactly_one_window_and_too_short_error() -> None:
    assert len(TokenWindowDataset(np.arange(9), seq_length=8)) == 1
    with pytest.raises(ValueError, match=r"8 tokens .* seq_length 8"):
        TokenWindowDataset(np.arange(8), seq_length=8)
    with pytest.raises(ValueError, match="seq_length 0"):
        TokenWindowDataset(np.arange(8), seq_length=0)
    with pytest.raises(ValueError, match="1-D"):
        TokenWindowDataset(np.zeros((4, 4), dtype=np.int64), seq_length=2)


def test_dataloader_batches_stack(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.uint16))
    ds = TokenWindowDataset(np.load(tmp_path / "t.npy", mmap_mode="r"), seq_length=16)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["tokens"].shape == batch["labels"].shape == (4, 16)
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert batch["tokens"][1, 0].item() == 16


def test_token_dtype_threshold() -> None:
    assert token_dtype(65535) is np.uint16
    assert token_dtype(65536) is np.uint32


def test_tokenize_corpus_concatenates_files_with_eos_and_caches(
    corpus: CorpusSpec, tok: EETokenizer, tmp_path: Path
) -> None:
    files = split_files(corpus)[0][:3]
    out = tmp_path / "toks" / "train.npy"
    arr = tokenize_corpus(files, tok, out)
    expected = [t for f in files for t in tok.encode(f.read_text()) + [tok.eos_id]]
    assert arr.dtype == np.uint16 and arr.tolist() == expected
    assert np.load(out).tolist() == expected
    mtime = out.stat().st_mtime_ns
    assert tokenize_corpus(files, tok, out).tolist() == expected
    assert out.stat().st_mtime_ns == mtime
    assert [p.name for p in out.parent.iterdir()] == ["train.npy"]


def test_build_datasets_end_to_end(corpus: CorpusSpec, tok: EETokenizer, tmp_path: Path) -> None:
    cache = tmp_path / "ds"
    train_ds, val_ds = build_datasets(corpus, tok, seq_length=32, cache_dir=cache)
    train_files, val_files = split_files(corpus)
    for ds, files in ((train_ds, train_files), (val_ds, val_files)):
        n = sum(len(tok.encode(f.read_text())) + 1 for f in files)
        assert len(ds.tokens) == n and len(ds) == (n - 1) // 32
    first_text = train_files[0].read_text()
    decoded = tok.decode(train_ds[0]["tokens"].tolist() + train_ds[1]["tokens"].tolist())
    assert first_text.startswith(decoded)
    names = sorted(p.name for p in cache.iterdir())
    key = f"{corpus_fingerprint(corpus)}-{tok.fingerprint[:16]}"
    assert names == [f"tokens-{key}-train.npy", f"tokens-{key}-val.npy"]
    again, _ = build_datasets(corpus, tok, seq_length=32, cache_dir=cache)
    assert np.array_equal(np.asarray(again.tokens), np.asarray(train_ds.tokens))
