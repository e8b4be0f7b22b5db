"""Write a .nemo of EarlyExitGPTNeMoModel from EarlyExitConfig fields, a megatron state dict and a tokenizer.

The one path every importer takes (HF transformers, megatron-core / NeMo-2 distributed checkpoints). An HF
import keeps the model's own tokenizer exactly; otherwise the tokenizer gets nemo_ee's special tokens
(appended as added tokens when missing, the vocabulary growing by their rows). Every tensor is checked against the model built from the fields, and the model is saved at
TP=PP=1 (``scripts/reshard.py`` / ``read_config(..., tp=, pp=)`` change the layout later).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["pad_vocab", "prepare_tokenizer", "write_nemo"]


def prepare_tokenizer(src: Path, out_dir: Path) -> tuple[Path, int]:
    """The tokenizer.json ``src``, with nemo_ee's special tokens (EETokenizer needs them) appended as
    added tokens if it lacks them. Returns (path of the tokenizer to embed, number of ids it has)."""
    from tokenizers import AddedToken, Tokenizer

    from nemo_ee.data.tokenizer import SPECIAL_TOKENS

    tok = Tokenizer.from_file(str(src))
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True) for t in missing])
    size = tok.get_vocab_size(with_added_tokens=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path, size


def pad_vocab(arch: dict, state: dict, size: int) -> None:
    """Grow the vocabulary to ``size`` rows (for appended special tokens): new rows = the mean row."""
    old = arch["vocab_size"]
    heads = [k for k in state if k.startswith("exits.") and k.endswith("output_layer.weight")]
    for key in ("embedding.word_embeddings.weight", "output_layer.weight", *heads):
        if key in state:
            w = state[key]
            state[key] = torch.cat([w, w.mean(0, keepdim=True).expand(size - old, -1)])
    arch["vocab_size"] = size


def write_nemo(arch: dict, state: dict[str, torch.Tensor], tokenizer_file: str | Path, out: str | Path,
               seed: int = 1234, exit_fields: Optional[dict] = None, hf_tokenizer_dir: str | Path | None = None,
               ) -> Path:
    """Save ``state`` (megatron GPTModel keys, plus ``exits.*`` when ``exit_fields`` has exits) as the .nemo
    ``out`` of an EarlyExitGPTNeMoModel with architecture ``arch`` and the tokenizer ``tokenizer_file``.

    ``hf_tokenizer_dir``: the HF tokenizer folder of an imported model (``tokenizer_file`` is its
    tokenizer.json); the model keeps that tokenizer exactly (:class:`nemo_ee.data.HFTokenizer`): no
    appended tokens, no new rows. Without it the tokenizer gets nemo_ee's special tokens (appended)."""
    from omegaconf import OmegaConf

    from nemo_ee.data.hf_tokenizer import BUNDLE_NAME, HFTokenizer, write_bundle
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    arch, state, out = dict(arch), dict(state), Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        tok_cfg: dict = {"cache_dir": None}
        if hf_tokenizer_dir is not None:
            bundle = write_bundle(hf_tokenizer_dir, Path(tmp) / BUNDLE_NAME)
            tok_size = HFTokenizer(tokenizer_file, bundle).vocab_size
            if tok_size > arch["vocab_size"]:
                raise ValueError(f"the tokenizer in {hf_tokenizer_dir} has {tok_size} tokens but the model's "
                                 f"vocabulary has {arch['vocab_size']} rows: it is not this model's tokenizer")
            tok_cfg.update(vocab_size=int(arch["vocab_size"]), tokenizer_file=str(tokenizer_file),
                           hf_tokenizer_file=str(bundle))
        else:
            tok_path, tok_size = prepare_tokenizer(Path(tokenizer_file), Path(tmp))
            if tok_size > arch["vocab_size"]:
                pad_vocab(arch, state, tok_size)
            tok_cfg.update(vocab_size=tok_size, tokenizer_file=str(tok_path))
        cfg = OmegaConf.create({
            "seed": seed, "micro_batch_size": 1, "global_batch_size": 1,
            "tokenizer": tok_cfg,
            "data": {"corpus_root": None, "val_fraction": 0.05, "max_files": None, "num_workers": 0},
            "optim": {"lr": 1.0e-4, "min_lr": 1.0e-5, "warmup_steps": 0, "decay_style": "cosine",
                      "weight_decay": 0.01, "clip_grad": 1.0},
            "arch": {**arch, "exit_layer_nums": [], **(exit_fields or {}), "tensor_model_parallel_size": 1,
                     "pipeline_model_parallel_size": 1},
        })
        model = EarlyExitGPTNeMoModel(cfg)
        expected = {k for k, v in model.model.state_dict().items() if v is not None and not k.endswith("_extra_state")}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(f"converted state does not match the model: missing {missing}, unexpected {extra}")
        params = model.model.state_dict()
        for key, value in state.items():
            if tuple(params[key].shape) != tuple(value.shape):
                raise ValueError(f"converted {key} has shape {list(value.shape)}, model expects "
                                 f"{list(params[key].shape)}")
        model.model.load_state_dict(state, strict=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save_to(str(out))
    return out
