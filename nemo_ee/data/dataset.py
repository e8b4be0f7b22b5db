"""Tokenized corpus cached as ``.npy`` and cut into non-overlapping next-token windows."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .corpus import CorpusSpec, corpus_fingerprint, iter_texts, split_files
from .tokenizer import EETokenizer
from nemo_ee.atomic import atomic_path


_BATCH_FILES = 64  # files per encode_batch call: enough to keep the Rust threads busy


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """Smallest unsigned dtype holding every id: uint16 below 65536, else uint32."""
    return np.uint16 if vocab_size < 2**16 else np.uint32


def tokenize_corpus(
    paths: Sequence[Path], tokenizer: EETokenizer, out_path: str | Path
) -> np.ndarray:
    """Encode files (eos after each) into one 1-D array at ``out_path``; reuse it if present."""
    out_path = Path(out_path)
    if out_path.is_file():
        return np.load(out_path, mmap_mode="r")
    paths = list(paths)
    chunks: list[np.ndarray] = []
    dtype = token_dtype(tokenizer.vocab_size)
    with tqdm(total=len(paths), desc=f"tokenizing {out_path.name}", unit="file") as bar:
        for start in range(0, len(paths), _BATCH_FILES):
            batch = paths[start : start + _BATCH_FILES]
            for ids in tokenizer.encode_batch(list(iter_texts(batch))):
                chunks.append(np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
            bar.update(len(batch))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)
    return np.load(out_path, mmap_mode="r")


class TokenWindowDataset(Dataset):
    """Sample i is window ``tokens[i*L : i*L+L+1]`` split into inputs and next-token labels."""

    def __init__(self, tokens: np.ndarray, seq_length: int) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        is_int = isinstance(seq_length, numbers.Integral) and not isinstance(seq_length, bool)
        if not is_int or seq_length < 1:
            raise ValueError(f"seq_length {seq_length!r} must be an integer >= 1")
        if len(tokens) < seq_length + 1:
            raise ValueError(
                f"{len(tokens)} tokens are too few for one window of seq_length {seq_length} "
                f"(need at least {seq_length + 1})"
            )
        self.tokens = tokens
        self.seq_length = int(seq_length)
        self._position_ids = torch.arange(self.seq_length, dtype=torch.long)
        self._loss_mask = torch.ones(self.seq_length, dtype=torch.float32)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"window index {index} out of range for {n} windows")
        start = (index % n) * self.seq_length
        window = torch.from_numpy(
            np.array(self.tokens[start : start + self.seq_length + 1], dtype=np.int64)
        )
        return {
            "tokens": window[:-1],
            "labels": window[1:],
            "loss_mask": self._loss_mask.clone(),
            "position_ids": self._position_ids.clone(),
        }


def build_datasets(
    spec: CorpusSpec, tokenizer: EETokenizer, seq_length: int, cache_dir: str | Path
) -> tuple[TokenWindowDataset, TokenWindowDataset]:
    """Tokenize both splits (cached per corpus + tokenizer) and wrap them as window datasets."""
    key = f"{corpus_fingerprint(spec)}-{tokenizer.fingerprint[:16]}"
    train_files, val_files = split_files(spec)
    datasets = []
    for name, files in (("train", train_files), ("val", val_files)):
        tokens = tokenize_corpus(files, tokenizer, Path(cache_dir) / f"tokens-{key}-{name}.npy")
        datasets.append(TokenWindowDataset(tokens, seq_length))
    return datasets[0], datasets[1]
