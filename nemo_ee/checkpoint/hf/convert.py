"""HF checkpoint directory -> .nemo: pick the family adapter, map the tensors, bring the tokenizer and exits."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from nemo_ee.checkpoint.hf.common import EXITS_CONFIG, EXITS_WEIGHTS, Adapter, SafetensorsReader
from nemo_ee.checkpoint.hf.gpt2 import GPT2Adapter
from nemo_ee.checkpoint.hf.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter


ADAPTERS: tuple[Adapter, ...] = (LlamaAdapter(), MistralAdapter(), Qwen2Adapter(), GPT2Adapter())


def supported_architectures() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.architectures]


def adapter_for(hf: dict) -> Adapter:
    names = hf.get("architectures") or []
    for adapter in ADAPTERS:
        if any(n in adapter.architectures for n in names):
            return adapter
    named = names or f"{hf.get('model_type')!r} (model_type; config.json lists no architectures)"
    raise ValueError(f"unsupported architecture {named}; supported: {supported_architectures()}")


# --------------------------------------------------------------------------------------------- conversion
def _tokenizer(src: Path, out_dir: Path) -> tuple[Path, int]:
    """The checkpoint's tokenizer.json, with nemo_ee's special tokens (EETokenizer needs them) appended as
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


def load_hf_config(hf_dir: str | Path) -> dict:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory {hf_dir} does not exist")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    return json.loads(path.read_text())


def convert_hf_state(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(EarlyExitConfig fields, megatron state dict) of an HF checkpoint directory."""
    hf_dir = Path(hf_dir)
    hf = load_hf_config(hf_dir)
    adapter = adapter_for(hf)
    arch = adapter.arch(hf)
    read = SafetensorsReader(hf_dir)
    state = adapter.convert(read, arch)
    unused = sorted(k for k in read.keys() - read.used if not adapter.ignored.match(k))
    if unused:
        raise ValueError(f"{adapter.name}: HF tensors the importer does not map: {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    return arch, state


def is_exit_field(name: str) -> bool:
    """EarlyExitConfig fields that describe the exit heads (what ``early_exits.json`` carries)."""
    return name.startswith("exit_") or name == "tie_exit_output"


def read_exits(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(EarlyExitConfig exit fields, ``exits.*`` megatron tensors) from the side files an export wrote next to
    the HF checkpoint; ``({}, {})`` when there are none. Both files or neither."""
    hf_dir = Path(hf_dir)
    cfg_path, w_path = hf_dir / EXITS_CONFIG, hf_dir / EXITS_WEIGHTS
    if not cfg_path.is_file() and not w_path.is_file():
        return {}, {}
    if not (cfg_path.is_file() and w_path.is_file()):
        raise FileNotFoundError(f"{hf_dir} has {cfg_path.name if cfg_path.is_file() else w_path.name} but not "
                                f"{w_path.name if cfg_path.is_file() else cfg_path.name}: exit heads need both")
    from safetensors.torch import load_file

    fields = json.loads(cfg_path.read_text())
    if not isinstance(fields, dict) or not isinstance(fields.get("exit_layer_nums"), list):
        raise ValueError(f"{cfg_path} has no exit_layer_nums list")
    other = sorted(k for k in fields if not is_exit_field(k))
    if other:
        raise ValueError(f"{cfg_path} sets fields that are not exit fields: {other}")
    state = load_file(str(w_path))
    bad = sorted(k for k in state if not k.startswith("exits."))
    if bad:
        raise ValueError(f"{w_path} holds tensors outside exits.*: {bad[:8]}")
    return fields, state


def _pad_vocab(arch: dict, state: dict, size: int) -> None:
    """Grow the vocabulary to ``size`` rows (for appended special tokens): new rows = the mean row."""
    old = arch["vocab_size"]
    heads = [k for k in state if k.startswith("exits.") and k.endswith("output_layer.weight")]
    for key in ("embedding.word_embeddings.weight", "output_layer.weight", *heads):
        if key in state:
            w = state[key]
            state[key] = torch.cat([w, w.mean(0, keepdim=True).expand(size - old, -1)])
    arch["vocab_size"] = size


def convert_hf_to_nemo(hf_dir: str | Path, out: str | Path, seed: int = 1234) -> Path:
    """Convert an HF checkpoint directory into a .nemo of EarlyExitGPTNeMoModel. Returns ``out``.

    No exits, unless the directory holds the side files ``early_exits.json`` + ``early_exits.safetensors``
    written by :mod:`nemo_ee.checkpoint.hf_export`: then the exit heads are restored too."""
    import tempfile

    from omegaconf import OmegaConf

    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    hf_dir, out = Path(hf_dir), Path(out)
    arch, state = convert_hf_state(hf_dir)
    exit_fields, exit_state = read_exits(hf_dir)
    state.update(exit_state)
    tok_src = hf_dir / "tokenizer.json"
    if not tok_src.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {hf_dir} (a HF `tokenizers` file is needed)")
    with tempfile.TemporaryDirectory() as tmp:
        tok_path, tok_size = _tokenizer(tok_src, Path(tmp))
        if tok_size > arch["vocab_size"]:
            _pad_vocab(arch, state, tok_size)
        cfg = OmegaConf.create({
            "seed": seed, "micro_batch_size": 1, "global_batch_size": 1,
            "tokenizer": {"vocab_size": tok_size, "tokenizer_file": str(tok_path), "cache_dir": None},
            "data": {"corpus_root": None, "val_fraction": 0.05, "max_files": None, "num_workers": 0},
            "optim": {"lr": 1.0e-4, "min_lr": 1.0e-5, "warmup_steps": 0, "decay_style": "cosine",
                      "weight_decay": 0.01, "clip_grad": 1.0},
            "arch": {**arch, "exit_layer_nums": [], **exit_fields, "tensor_model_parallel_size": 1,
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


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face transformers checkpoint (config.json, *.safetensors, tokenizer.json) "
                    "into a .nemo of EarlyExitGPTNeMoModel (with exit heads only if the directory holds the early_exits.json + "
                    "early_exits.safetensors side files of convert_nemo_to_hf.py). Supported architectures: "
                    + ", ".join(supported_architectures()) + ".",
    )
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json, *.safetensors, "
                        "tokenizer.json); weights are read with safetensors only")
    parser.add_argument("--out", required=True, help="path of the .nemo file to write")
    parser.add_argument("--seed", type=int, default=1234, help="seed recorded in the model config (default 1234)")
    args = parser.parse_args(argv)
    path = convert_hf_to_nemo(args.hf_dir, args.out, seed=args.seed)
    print(f"wrote {path}")
