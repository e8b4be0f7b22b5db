"""Byte-level BPE tokenizer trained on the corpus train split, cached as a JSON file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import CorpusSpec, corpus_fingerprint, iter_texts, split_files
from nemo_ee.atomic import atomic_path


EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 1_000_000


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (nemo_ee.atomic)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _train(files: Sequence[Path], vocab_size: int) -> Tokenizer:
    """Train a fresh byte-level BPE with the special tokens at ids 0 and 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(iter_texts(files), trainer=trainer, length=len(files))
    return tok


def train_tokenizer(spec: CorpusSpec, vocab_size: int, cache_dir: str | Path) -> Path:
    """Train on the train split (or reuse the cached file) and return the tokenizer JSON path."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
        MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE
    ):
        raise ValueError(
            f"vocab_size {vocab_size!r} is outside [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}]"
        )
    path = Path(cache_dir) / f"tokenizer-{corpus_fingerprint(spec)}-{vocab_size}.json"
    if path.is_file():
        return path
    train, _ = split_files(spec)
    if not train:
        raise ValueError(f"corpus at {str(spec.root_path)!r} has no training files")
    _atomic_write_text(path, _train(train, vocab_size).to_str(pretty=True))
    return path


class EETokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` exposing the ids the model needs."""

    def __init__(self, tokenizer: Tokenizer, path: str | Path | None = None) -> None:
        self._tok = tokenizer
        self.path: Path | None = Path(path) if path is not None else None
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"tokenizer lacks special tokens {SPECIAL_TOKENS}; got ids {ids}")
        self.eos_id: int = ids[0]
        self.pad_id: int = ids[1]
        self.eos_ids: tuple[int, ...] = (self.eos_id,)  # the ids generation stops at by default
        self.bos_id = None
        self.chat_template = None

    @classmethod
    def from_file(cls, path: str | Path) -> "EETokenizer":
        """Load a tokenizer JSON written by ``train_tokenizer`` or ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        return cls(Tokenizer.from_file(str(path)), path)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the embedding table size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha1 of the serialized tokenizer, so caches notice any tokenizer change."""
        return hashlib.sha1(self._tok.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; exact inverse of ``encode`` for any UTF-8 text."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """nemo_ee's own tokenizers have no chat template: a clear error (imported models' HFTokenizer has one)."""
        raise ValueError("this model's tokenizer has no chat template (a nemo_ee-trained model); send a plain prompt")

    def save_files(self, folder: str | Path) -> dict[str, str]:
        """Write the tokenizer JSON as ``folder/tokenizer.json`` (without repointing ``self.path``); the
        ``tokenizer`` config entries that name it."""
        target = Path(folder) / "tokenizer.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(target, self._tok.to_str(pretty=True))
        return {"tokenizer_file": str(target)}

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer JSON atomically and remember it as ``self.path``."""
        self.path = Path(path)
        _atomic_write_text(self.path, self._tok.to_str(pretty=True))
        return self.path
