"""Stage ``corpus``: the stdlib corpus split by file, its byte-level BPE, both splits tokenized (all cached)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nemo_ee.pipeline.base import StageContext, StageResult
from nemo_ee.pipeline.report import Section, markdown_table, text_table


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.1f} kB"


def corpus_settings(cfg: DictConfig) -> dict:
    """What the corpus stage depends on: the data section, vocabulary size, window length, given tokenizer."""
    model = cfg.pretrain.model
    return {"data": {k: model.data.get(k) for k in ("corpus_root", "val_fraction", "max_files")},
            "vocab_size": model.tokenizer.vocab_size, "seq_length": model.arch.seq_length,
            "tokenizer_file": cfg.stages.corpus.get("tokenizer_file")}


def check_corpus(cfg: DictConfig, given: dict) -> None:
    """The corpus spec (root, split, max_files) and a given tokenizer file, before any work."""
    from nemo_ee.models.nemo_model import _corpus_spec

    _corpus_spec(cfg.pretrain.model.data)  # bad corpus_root / val_fraction / max_files
    path = cfg.stages.corpus.get("tokenizer_file")
    if path is not None and not Path(str(path)).is_file():
        raise ValueError(f"stages.corpus.tokenizer_file={path}: no such file")


def run_corpus(ctx: StageContext) -> StageResult:
    """Train (or reuse) the byte-level BPE on the corpus' train split and tokenize both splits (cached)."""
    from nemo_ee.data import EETokenizer, build_datasets, split_files, train_tokenizer
    from nemo_ee.models.nemo_model import _cache_dir, _corpus_spec

    model = ctx.cfg.pretrain.model
    spec, cache = _corpus_spec(model.data), _cache_dir(model)
    train_files, val_files = split_files(spec)
    given = ctx.stage_cfg.get("tokenizer_file")
    tok_path = Path(str(given)) if given else train_tokenizer(spec, int(model.tokenizer.vocab_size), cache)
    tokenizer = EETokenizer.from_file(tok_path)
    train_ds, val_ds = build_datasets(spec, tokenizer, int(model.arch.seq_length), cache)
    stats = {
        "corpus_root": str(spec.root_path), "train_files": len(train_files), "val_files": len(val_files),
        "train_bytes": sum(p.stat().st_size for p in train_files), "val_bytes": sum(p.stat().st_size for p in val_files),
        "train_tokens": int(len(train_ds.tokens)), "val_tokens": int(len(val_ds.tokens)),
        "train_windows": len(train_ds), "val_windows": len(val_ds), "vocab_size": tokenizer.vocab_size,
        "seq_length": int(model.arch.seq_length), "cache_dir": str(cache),
    }
    rows = [[split, stats[f"{split}_files"], _size(stats[f"{split}_bytes"]), stats[f"{split}_tokens"],
             stats[f"{split}_windows"]] for split in ("train", "val")]
    headers = ["split", "files", "size", "tokens", f"windows of {stats['seq_length']}"]
    print(text_table(headers, rows), flush=True)
    body = (f"Corpus: `.py` files under `{stats['corpus_root']}`, split by file. Tokenizer: byte-level BPE, "
            f"{stats['vocab_size']} tokens, `{tok_path}` "
            f"({(stats['train_bytes'] + stats['val_bytes']) / max(stats['train_tokens'] + stats['val_tokens'], 1):.2f} "
            f"bytes per token). Cached in `{cache}`.\n\n" + markdown_table(headers, rows))
    return StageResult({"tokenizer_file": str(tok_path), **stats}, [Section("Corpus and tokenizer", body)])


