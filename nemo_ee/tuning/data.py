"""What EE-Tuning trains on: windows of the corpus's train split and/or ``.npy`` token streams (the model's own
answers, :mod:`nemo_ee.tuning.self_data`), from the ``data`` section of conf/ee_tuning.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def data_sources(cfg: Any) -> tuple[bool, list[Path]]:
    """(use the corpus, token files) of the tuning ``data`` section, checked: ``data.corpus`` (windows of the
    model's corpus) and ``data.token_files`` (.npy token streams, e.g. the model's own chat answers written by
    scripts/make_tuning_data.py); at least one source."""
    data = cfg.get("data") or {}
    corpus = data.get("corpus", True)
    if not isinstance(corpus, bool):
        raise ValueError(f"data.corpus={corpus!r} must be true or false")
    files = data.get("token_files") or []
    if isinstance(files, str):
        files = [files]
    paths = [Path(str(f)) for f in files]
    for path in paths:
        if path.suffix != ".npy" or not path.is_file():
            raise FileNotFoundError(f"data.token_files: {path} is not an .npy file")
    if not corpus and not paths:
        raise ValueError("data.corpus=false and no data.token_files: nothing to tune on")
    return corpus, paths


def tuning_dataset(cfg: Any, model_cfg: Any, tokenizer: Any, seq_length: int, vocab_size: int) -> Any:
    """The windows EE-Tuning trains on: the corpus's train split and/or each of ``data.token_files``
    (concatenated, in that order); a token file with ids outside the vocabulary is an error."""
    import numpy as np
    from omegaconf import OmegaConf
    from torch.utils.data import ConcatDataset

    from nemo_ee.data import TokenWindowDataset, build_datasets
    from nemo_ee.models.nemo_model import _cache_dir, _corpus_spec

    corpus, paths = data_sources(cfg)
    parts: list = []
    if corpus:
        overrides = {k: v for k, v in (cfg.get("data") or {}).items()
                     if v is not None and k not in ("corpus", "token_files")}
        data_cfg = OmegaConf.merge(model_cfg.data, overrides)
        # the cache holds the tokenized corpus (keyed by corpus and tokenizer); windows are cut at any length
        parts.append(build_datasets(_corpus_spec(data_cfg), tokenizer, seq_length, _cache_dir(model_cfg))[0])
    for path in paths:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"data.token_files: {path} must hold a 1-D integer array, got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise ValueError(f"data.token_files: {path} has token id {int(tokens.max())}, outside the model's "
                             f"vocabulary 0..{vocab_size - 1}")
        parts.append(TokenWindowDataset(tokens, seq_length))
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)
