"""Plain GPT from a megatron-core or NeMo-2 distributed checkpoint -> .nemo of EarlyExitGPTNeMoModel (no exits).

EarlyExitGPTModel is megatron's ``GPTModel`` plus exit heads: with no exits, its ``sharded_state_dict`` has
exactly GPTModel's keys, so ``megatron.core.dist_checkpointing.load`` fills it from any ``torch_dist``
checkpoint a GPTModel wrote, at any TP/PP layout (the checkpoint holds global tensors). Layouts:

* megatron-core / Megatron-LM: ``<dir>/metadata.json`` + ``.metadata`` + ``*.distcp`` (keys
  ``decoder.layers...``; Megatron-LM writes one such folder per ``iter_*``);
* NeMo-2: ``<dir>/weights/`` holds that checkpoint with keys prefixed ``module.``, ``<dir>/context/model.yaml``
  the GPT config and ``<dir>/context/nemo_tokenizer/`` the tokenizer files.

Only model tensors are read: optimizer state is ignored and ``common.pt`` (pickled) is never opened. The
architecture comes from YAML (:mod:`nemo_ee.checkpoint.megatron_arch`); the vocabulary size and learned
position count come from the checkpoint's tensor metadata. Every tensor name and global shape is checked
against the model before any weight is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from nemo_ee.checkpoint.megatron_arch import (
    PICKLE_NOTE,
    arch_from_nemo2,
    arch_from_yaml,
    check_required,
    parse_overrides,
)

__all__ = ["Checkpoint", "convert_megatron_to_nemo", "load_megatron_state", "locate", "main", "resolve_arch",
           "resolve_tokenizer"]

_MARKER = "metadata.json"
_ANCHORS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight")
_HINT = ("check share_embeddings_and_output_weights, position_embedding_type, normalization, add_bias_linear, "
         "add_qkv_bias")


@dataclass
class Checkpoint:
    """Where a distributed checkpoint's tensors, config and tokenizer are."""

    root: Path
    weights: Path
    model_yaml: Optional[Path] = None
    tokenizer: Optional[Path] = None


def locate(ckpt_dir: str | Path) -> Checkpoint:
    """The checkpoint's layout (megatron-core or NeMo-2), or a clear error saying what the folder is not."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if root.name == "weights" and (root.parent / "context").is_dir():  # a NeMo-2 checkpoint's weights/ folder
        root = root.parent
    if (root / "weights" / _MARKER).is_file():
        ckpt = Checkpoint(root, root / "weights")
        ctx = root / "context"
        ckpt.model_yaml = ctx / "model.yaml" if (ctx / "model.yaml").is_file() else None
        tok = ctx / "nemo_tokenizer" / "tokenizer.json"
        ckpt.tokenizer = tok if tok.is_file() else None
    elif (root / _MARKER).is_file():
        ckpt = Checkpoint(root, root)
    else:
        iters = sorted(p.name for p in root.glob("iter_*") if p.is_dir())
        hint = (f"; it looks like a Megatron-LM save folder: pass one of its iteration folders, e.g. "
                f"{root / iters[-1]}" if iters else "")
        raise FileNotFoundError(f"{root} is not a distributed checkpoint: no {_MARKER} (nor weights/{_MARKER} of a "
                                f"NeMo-2 checkpoint){hint}")
    backend = json.loads((ckpt.weights / _MARKER).read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise ValueError(f"{ckpt.weights}: sharded backend {backend!r} is not supported (only 'torch_dist', "
                         "megatron-core's default)")
    return ckpt


def _tensor_shapes(weights: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(key prefix, {model key without prefix: global shape}) of the checkpoint's model tensors."""
    from nemo_ee.checkpoint.dist import _megatron

    meta = _megatron().load_tensors_metadata(str(weights))
    keys = [k for k in meta if not k.startswith("optimizer.")]
    prefix = next((k[: -len(a)] for a in _ANCHORS for k in keys if k.endswith(a)), None)
    if prefix is None:
        raise ValueError(f"{weights} holds no GPT model tensors (no key ending in {' or '.join(_ANCHORS)})")
    return prefix, {k[len(prefix):]: tuple(meta[k].global_shape) for k in keys if k.startswith(prefix)}


def resolve_arch(ckpt: Checkpoint, arch_yaml: Optional[str | Path] = None,
                 overrides: Sequence[str] = (), shapes: Optional[dict] = None) -> dict:
    """EarlyExitConfig fields: NeMo-2 model.yaml, then ``arch_yaml``, then ``overrides``; vocabulary size and
    learned position count from the checkpoint's tensor shapes when no source gives them."""
    arch: dict[str, Any] = {}
    origins = []
    if ckpt.model_yaml is not None:
        arch.update(arch_from_nemo2(ckpt.model_yaml))
        origins.append(str(ckpt.model_yaml))
    if arch_yaml is not None:
        arch.update(arch_from_yaml(arch_yaml))
        origins.append(str(arch_yaml))
    if overrides:
        arch.update(parse_overrides(overrides))
        origins.append("overrides")
    check_required(arch, "from " + " + ".join(origins) if origins else "no --arch YAML, no overrides, no "
                   "context/model.yaml")
    shapes = shapes or {}
    if arch.get("vocab_size") is None:
        if "embedding.word_embeddings.weight" not in shapes:
            raise ValueError("the checkpoint has no embedding.word_embeddings.weight to read the vocabulary size "
                             "from: pass it as an override (vocab_size=N)")
        arch["vocab_size"] = shapes["embedding.word_embeddings.weight"][0]
    positions = shapes.get("embedding.position_embeddings.weight")
    if positions and arch.get("position_embedding_type", "learned_absolute") == "learned_absolute":
        arch.setdefault("max_position_embeddings", positions[0])
        arch.setdefault("seq_length", positions[0])
    return arch


def _expected_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """{sharded key: global shape} of the model's tensors, as the checkpoint should hold them."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    out: dict[str, tuple[int, ...]] = {}

    def visit(value: Any) -> None:
        if isinstance(value, ShardedTensor):
            out[value.key] = tuple(value.global_shape)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(sharded)
    return out


def _few(keys: Sequence[str], limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_match(weights: Path, expected: dict, found: dict) -> None:
    """Name missing / unexpected tensors and the first shape mismatch (key and both shapes)."""
    missing, extra = set(expected) - set(found), set(found) - set(expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model expects {len(missing)} tensor(s) the checkpoint lacks: {_few(missing)}")
        if extra:
            parts.append(f"the checkpoint has {len(extra)} tensor(s) the model does not: {_few(extra)}")
        raise ValueError(f"checkpoint {weights} does not match the architecture: {'; '.join(parts)} ({_HINT})")
    for key in sorted(expected):
        if expected[key] != found[key]:
            raise ValueError(f"checkpoint tensor {key} has shape {list(found[key])}, the architecture expects "
                             f"{list(expected[key])}")


def _no_common_strategy() -> Any:
    """A common-load strategy that never opens common.pt (pickled; see :data:`PICKLE_NOTE`)."""
    from megatron.core.dist_checkpointing.strategies.base import LoadCommonStrategy

    class NoCommonLoad(LoadCommonStrategy):
        def load_common(self, checkpoint_dir: Any) -> dict:
            return {}

        def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: Any) -> dict:
            raise ValueError(f"sharded objects are not read from {checkpoint_dir} (pickled data)")

        def check_backend_compatibility(self, loaded_backend: Any) -> None:
            return None

        def check_version_compatibility(self, loaded_version: Any) -> None:
            return None

    return NoCommonLoad()


def load_megatron_state(ckpt: Checkpoint, arch: dict, prefix: str, found: dict) -> dict[str, torch.Tensor]:
    """Build the no-exit model for ``arch`` (TP=PP=1, fp32), check it against the checkpoint's tensors and
    load them through dist_checkpointing. Returns the model's plain state dict."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    from nemo_ee.checkpoint.dist import _megatron
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.models import build_model
    from nemo_ee.parallel.initialize import initialize_distributed

    ee = EarlyExitConfig.from_dict({**arch, "exit_layer_nums": [], "params_dtype": "float32"})
    initialize_distributed(1, 1, seed=1234)
    model = build_model(ee)
    _check_match(ckpt.weights, _expected_shapes(model), found)
    request = {k: v for k, v in model.sharded_state_dict().items() if not isinstance(v, ShardedObject)}
    if prefix:
        replace_prefix_for_sharding(request, "", prefix)
    loaded = _megatron().load(request, str(ckpt.weights), common_strategy=_no_common_strategy())
    result = model.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:  # pragma: no cover - _check_match covers every tensor
        raise ValueError(f"loaded state does not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if v is not None and not k.endswith("_extra_state")}


def resolve_tokenizer(ckpt: Checkpoint, tokenizer: Optional[str | Path], vocab_size: int,
                      corpus: Any = None, cache_dir: Optional[str | Path] = None) -> Path:
    """The tokenizer.json to embed: ``tokenizer`` (a file or an HF tokenizer folder), else a NeMo-2
    checkpoint's ``context/nemo_tokenizer``, else nemo_ee's default byte-level BPE trained on ``corpus``
    (default: the embedded stdlib corpus) with the checkpoint's vocabulary size."""
    import os

    from tokenizers import Tokenizer

    from nemo_ee.data import CorpusSpec, train_tokenizer
    from nemo_ee.data.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE

    path = Path(tokenizer) if tokenizer is not None else ckpt.tokenizer
    if path is not None:
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist (give an HF tokenizer folder with "
                                    "tokenizer.json, or the tokenizer.json itself)")
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise ValueError(f"tokenizer {path} has {size} tokens but the checkpoint's vocabulary has {vocab_size} "
                             "rows: it is not this model's tokenizer")
        return path
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"the checkpoint's vocabulary has {vocab_size} rows; nemo_ee's default byte-level BPE "
                         f"needs {MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE}: pass the model's tokenizer with --tokenizer DIR")
    cache = Path(os.path.expanduser(str(cache_dir or os.environ.get("NEMO_EE_CACHE", "~/.cache/nemo_ee"))))
    return train_tokenizer(corpus or CorpusSpec(), vocab_size, cache)


def convert_megatron_to_nemo(ckpt_dir: str | Path, out: str | Path, arch_yaml: Optional[str | Path] = None,
                             overrides: Sequence[str] = (), tokenizer: Optional[str | Path] = None,
                             seed: int = 1234, corpus: Any = None, cache_dir: Optional[str | Path] = None) -> Path:
    """Convert a megatron-core / NeMo-2 distributed checkpoint of a plain GPT into a .nemo (no exits).

    ``corpus`` (a :class:`~nemo_ee.data.CorpusSpec`) and ``cache_dir`` only matter for the default tokenizer."""
    from nemo_ee.checkpoint.nemo_file import write_nemo
    from nemo_ee.config import EarlyExitConfig

    ckpt, out = locate(ckpt_dir), Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give the path of the .nemo file to write")
    prefix, found = _tensor_shapes(ckpt.weights)
    arch = resolve_arch(ckpt, arch_yaml, overrides, found)
    EarlyExitConfig.from_dict({**arch, "exit_layer_nums": []})  # bad values fail before any tensor is read
    tok = resolve_tokenizer(ckpt, tokenizer, int(arch["vocab_size"]), corpus, cache_dir)
    state = load_megatron_state(ckpt, arch, prefix, found)
    return write_nemo(arch, state, tok, out, seed=seed)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """``scripts/convert_megatron_to_nemo.py``."""
    import argparse
    import textwrap

    parser = argparse.ArgumentParser(
        prog="convert_megatron_to_nemo.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(textwrap.fill(par, 100) for par in (
            "Convert a plain GPT saved as a megatron-core distributed checkpoint (torch_dist: metadata.json, "
            ".metadata, *.distcp; e.g. a Megatron-LM iter_* folder) or as a NeMo-2 checkpoint (weights/ + context/) "
            "into a .nemo of the early-exit GPT, with no exits (add them with scripts/add_exits.py).",
            "The checkpoint holds tensors only; the architecture comes from a NeMo-2 checkpoint's "
            "context/model.yaml, --arch YAML and KEY=VALUE overrides (later ones win). The vocabulary size and "
            "learned position count are read from the tensor shapes; every tensor name and shape is checked "
            f"before any weight is read. {PICKLE_NOTE}, so a Megatron-LM model needs --arch or overrides.",
            "Optimizer state is ignored; a checkpoint saved at any TP/PP layout loads; the .nemo is TP=PP=1, "
            "fp32 (bf16 checkpoints are upcast exactly).",
        )),
        epilog=(
            "examples:\n"
            "  # Megatron-LM / megatron-core GPT (llama-like), architecture on the command line\n"
            "  python scripts/convert_megatron_to_nemo.py --ckpt ckpts/iter_0010000 --out llama.nemo \\\n"
            "      --tokenizer hf_tokenizer_dir num_layers=16 hidden_size=2048 num_attention_heads=32 \\\n"
            "      num_query_groups=8 ffn_hidden_size=8192 normalization=RMSNorm activation=swiglu \\\n"
            "      add_bias_linear=false position_embedding_type=rope rotary_base=500000 \\\n"
            "      share_embeddings_and_output_weights=false seq_length=4096\n"
            "  # a nemo_ee recipe's model.arch section (exit fields are ignored)\n"
            "  python scripts/convert_megatron_to_nemo.py --ckpt ckpt_dir --out tiny.nemo --arch conf/ee_gpt_tiny.yaml\n"
            "  # NeMo-2 checkpoint: architecture from context/model.yaml, tokenizer from context/nemo_tokenizer\n"
            "  python scripts/convert_megatron_to_nemo.py --ckpt nemo2_run/checkpoints/step=1000 --out model.nemo\n"
        ),
    )
    parser.add_argument("--ckpt", required=True, type=Path,
                        help="megatron-core checkpoint folder (holds metadata.json) or NeMo-2 checkpoint folder "
                             "(holds weights/ and context/)")
    parser.add_argument("--out", required=True, type=Path, help="path of the .nemo file to write")
    parser.add_argument("--arch", type=Path, default=None,
                        help="YAML with EarlyExitConfig fields: a nemo_ee recipe (model.arch is used), an arch: "
                             "section or a flat mapping")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="HF tokenizer folder with tokenizer.json (or the file itself). Default: a NeMo-2 "
                             "checkpoint's context/nemo_tokenizer, else nemo_ee's byte-level BPE trained on the "
                             "embedded corpus with the checkpoint's vocabulary size (only right for models "
                             "trained with it)")
    parser.add_argument("--seed", type=int, default=1234, help="seed recorded in the model config (default 1234)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="EarlyExitConfig fields, e.g. num_layers=24 num_query_groups=8 add_bias_linear=false")
    args = parser.parse_args(argv)
    try:
        path = convert_megatron_to_nemo(args.ckpt, args.out, arch_yaml=args.arch, overrides=args.overrides,
                                        tokenizer=args.tokenizer, seed=args.seed)
    except (ValueError, FileNotFoundError, IsADirectoryError) as exc:
        parser.error(str(exc))
    print(f"wrote {path}")
    return path
