"""HF checkpoint directory -> .nemo: pick the family adapter, map the tensors, bring the tokenizer and exits."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from nemo_ee.checkpoint.hf.common import EXITS_CONFIG, EXITS_WEIGHTS, Adapter, SafetensorsReader
from nemo_ee.checkpoint.hf.gpt2 import GPT2Adapter
from nemo_ee.checkpoint.hf.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
from nemo_ee.checkpoint.nemo_file import write_nemo


ADAPTERS: tuple[Adapter, ...] = (LlamaAdapter(), MistralAdapter(), Qwen2Adapter(), Qwen3Adapter(), GPT2Adapter())


def supported_architectures() -> list[str]:
    """HF ``architectures`` names the importer converts."""
    return [name for adapter in ADAPTERS for name in adapter.architectures]


def adapter_for(hf: dict) -> Adapter:
    """The family adapter for an HF config dict: by its ``architectures``, or, when it lists none (a config
    made from a GGUF file, say), by its ``model_type``; a ValueError names the supported ones."""
    names = hf.get("architectures") or []
    for adapter in ADAPTERS:
        if any(n in adapter.architectures for n in names):
            return adapter
    if not names:
        for adapter in ADAPTERS:
            if hf.get("model_type") in adapter.model_types:
                return adapter
    named = names or f"{hf.get('model_type')!r} (model_type; config.json lists no architectures)"
    raise ValueError(f"unsupported architecture {named}; supported: {supported_architectures()}")


# --------------------------------------------------------------------------------------------- conversion
def load_hf_config(hf_dir: str | Path) -> dict:
    """The ``config.json`` of an HF checkpoint directory, with clear errors for a missing folder or file."""
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


def keep_first_layers(arch: dict, state: dict[str, torch.Tensor], num_layers: int) -> None:
    """Cut a converted model to its first ``num_layers`` layers (embedding, final norm and output layer kept):
    a small model of the real weights for quick trials and tests (transformers' own model with
    ``num_hidden_layers=num_layers`` is its reference)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= arch["num_layers"]:
        raise ValueError(f"num_layers={num_layers!r} is outside 1..{arch['num_layers']}")
    for key in [k for k in state if k.startswith("decoder.layers.") and int(k.split(".")[2]) >= num_layers]:
        del state[key]
    arch["num_layers"] = num_layers


def convert_hf_to_nemo(hf_dir: str | Path, out: str | Path, seed: int = 1234,
                       num_layers: Optional[int] = None) -> Path:
    """Convert an HF checkpoint directory into a .nemo of EarlyExitGPTNeMoModel. Returns ``out``.

    No exits, unless the directory holds the side files ``early_exits.json`` + ``early_exits.safetensors``
    written by :mod:`nemo_ee.checkpoint.hf_export`: then the exit heads are restored too. ``num_layers``:
    keep only the first layers (:func:`keep_first_layers`; not with exit side files)."""
    hf_dir, out = Path(hf_dir), Path(out)
    arch, state = convert_hf_state(hf_dir)
    if num_layers is not None:
        keep_first_layers(arch, state, num_layers)
    exit_fields, exit_state = read_exits(hf_dir)
    if exit_fields and num_layers is not None:
        raise ValueError(f"{hf_dir} holds exit heads: keep all its layers (num_layers=None)")
    state.update(exit_state)
    tok_src = hf_dir / "tokenizer.json"
    if not tok_src.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {hf_dir} (a HF `tokenizers` file is needed)")
    return write_nemo(arch, state, tok_src, out, seed=seed, exit_fields=exit_fields, hf_tokenizer_dir=hf_dir)


def main(argv: Optional[list[str]] = None) -> None:
    """``scripts/convert_hf_to_nemo.py``."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Convert a Hugging Face transformers checkpoint (config.json, *.safetensors, tokenizer.json) "
                    "into a .nemo of EarlyExitGPTNeMoModel (with exit heads only if the directory holds the early_exits.json + "
                    "early_exits.safetensors side files of convert_nemo_to_hf.py). Supported architectures: "
                    + ", ".join(supported_architectures()) + ".",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="HF checkpoint directory (config.json, *.safetensors, "
                     "tokenizer.json); weights are read with safetensors only")
    src.add_argument("--gguf", nargs="?", const="", metavar="FILE",
                     help="a GGUF file (read by transformers' GGUF loader, dequantised to fp32); with no FILE, "
                          "the project's default model SmolLM2-135M-Instruct (fetched by scripts/fetch_model.py)")
    parser.add_argument("--out", required=True, help="path of the .nemo file to write")
    parser.add_argument("--seed", type=int, default=1234, help="seed recorded in the model config (default 1234)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".nemo"):
        parser.error(f"--out {args.out} must end in .nemo")
    try:
        hf_dir = args.hf_dir
        if args.gguf is not None:
            from nemo_ee.checkpoint.hf.gguf import cached_hf_dir, locate_gguf

            hf_dir = cached_hf_dir(args.gguf or locate_gguf())
            print(f"GGUF as an HF folder: {hf_dir}")
        path = convert_hf_to_nemo(hf_dir, args.out, seed=args.seed)
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {path}")
