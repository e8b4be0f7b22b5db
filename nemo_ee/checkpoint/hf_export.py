"""Export an EarlyExitGPTNeMoModel (.nemo) as a standard Hugging Face transformers checkpoint directory.

The backbone goes out as the HF family's ``config.json`` + ``model.safetensors`` (loadable with
``transformers.AutoModelForCausalLM.from_pretrained``), plus ``tokenizer.json`` and a minimal
``tokenizer_config.json`` (``PreTrainedTokenizerFast``). The tensor and config mappings are the inverse of the
importer's per-family adapters in :mod:`nemo_ee.checkpoint.hf`, so HF -> .nemo -> HF reproduces every tensor
bit-exactly.

The exit heads have no HF equivalent: they go out as side files that HF ignores and
:func:`nemo_ee.checkpoint.hf.convert_hf_to_nemo` reads back:

* ``early_exits.safetensors``: the megatron tensors of the heads, keys ``exits.*`` as in the GPTModel state dict;
* ``early_exits.json``: the EarlyExitConfig exit fields (``exit_layer_nums``, ``exit_position``, ``exit_norm``,
  ``exit_mlp``, ``exit_block``, ``tie_exit_output`` and the per-exit loss fields).

Family inference from the architecture: LayerNorm + learned positions + GELU -> gpt2; RMSNorm + RoPE + SwiGLU ->
llama without q/k/v bias, qwen2 with it; mistral only when asked (it is the llama layout; a ``seq_length`` below
``max_position_embeddings`` is exported as the sliding window). Anything else raises ``ValueError`` naming why.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from nemo_ee.checkpoint.hf import ADAPTERS, EXITS_CONFIG, EXITS_WEIGHTS, Adapter, is_exit_field

FAMILIES = tuple(a.name for a in ADAPTERS)


def _adapter(name: str) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise ValueError(f"unknown HF family {name!r}; supported: {list(FAMILIES)}")


def infer_family(arch: dict) -> str:
    """The HF family whose architecture is ``arch`` (mistral is never inferred: it is llama's layout)."""
    reasons = {}
    for name in ("gpt2", "llama", "qwen2", "qwen3"):
        bad = _adapter(name).unsupported(arch)
        if not bad:
            return name
        reasons[name] = bad
    raise ValueError("no HF family represents this architecture: "
                     + "; ".join(f"{name} needs {', '.join(bad)}" for name, bad in reasons.items()))


def _check(arch: dict, family: str) -> Adapter:
    adapter = _adapter(family)
    bad = adapter.unsupported(arch)
    if arch.get("kv_channels") is None and arch["hidden_size"] % arch["num_attention_heads"]:
        bad.append(f"hidden_size={arch['hidden_size']} not divisible by num_attention_heads="
                   f"{arch['num_attention_heads']}")
    if bad:
        raise ValueError(f"the model cannot be exported as {family}: {', '.join(bad)}")
    if family != "gpt2" and arch.get("gelu_approximate", "none") != "none":
        raise ValueError(f"{family}: gelu_approximate={arch['gelu_approximate']!r} has no meaning for swiglu")
    return adapter


def _tokenizer_files(model, out: Path, seq_length: int) -> dict:
    """The model's tokenizer files and its special-token ids for config.json. An imported model's own HF
    tokenizer is written back as it came (tokenizer_config.json, chat template, generation_config.json with
    its stop ids); nemo_ee's own tokenizer gets tokenizer.json verbatim and a minimal tokenizer_config.json."""
    tok = model.tokenizer
    if hasattr(tok, "save_pretrained"):  # HFTokenizer
        tok.save_pretrained(out)
        eos = list(tok.eos_ids)
        generation = {"bos_token_id": tok.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
                      "pad_token_id": tok.pad_id}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        return {"eos_token_id": generation["eos_token_id"], "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id}
    tok.save_files(out)
    from nemo_ee.data.tokenizer import EOS_TOKEN, PAD_TOKEN

    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
        "bos_token": None, "unk_token": None, "model_max_length": int(seq_length), "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    return {"eos_token_id": int(tok.eos_id), "pad_token_id": int(tok.pad_id), "bos_token_id": None}


def export_model(model, out: str | Path, family: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write ``model`` (an EarlyExitGPTNeMoModel at TP=PP=1) as an HF checkpoint directory ``out``."""
    from safetensors.torch import save_file

    ee = model.ee_config
    if ee.tensor_model_parallel_size * ee.pipeline_model_parallel_size > 1:
        raise ValueError(f"export needs the whole model on one rank (TP=PP=1), got TP={ee.tensor_model_parallel_size} "
                         f"PP={ee.pipeline_model_parallel_size}: reshard first (scripts/reshard.py)")
    arch = ee.to_dict()
    arch["ffn_hidden_size"] = ee.ffn_size
    arch["max_position_embeddings"] = ee.max_position_embeddings or ee.seq_length
    family = family or infer_family(arch)
    adapter = _check(arch, family)

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out} exists and is not an empty directory (pass overwrite=True to write into it)")
    out.mkdir(parents=True, exist_ok=True)

    state = {k: v.detach().cpu() for k, v in model.model.state_dict().items()
             if v is not None and not k.endswith("_extra_state")}
    backbone = {k: v for k, v in state.items() if not k.startswith("exits.")}
    tensors = adapter.export(backbone, arch)
    n_backbone = sum(v.numel() for v in backbone.values())
    n_hf = sum(v.numel() for v in tensors.values())
    if n_hf != n_backbone:
        raise ValueError(f"{family}: exported {n_hf} parameters but the backbone has {n_backbone} (unmapped tensors)")
    for name in (EXITS_WEIGHTS, EXITS_CONFIG):  # stale side files from an earlier export
        if (out / name).exists():
            (out / name).unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = adapter.hf_config(arch)
    config.update(_tokenizer_files(model, out, ee.seq_length))
    config.update(dtype=ee.params_dtype, use_cache=True)
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")

    if ee.num_exits:
        exits = {k: v.contiguous() for k, v in state.items() if k.startswith("exits.")}
        save_file(exits, str(out / EXITS_WEIGHTS), metadata={"format": "pt"})
        fields = {k: v for k, v in arch.items() if is_exit_field(k)}
        (out / EXITS_CONFIG).write_text(json.dumps(fields, indent=2) + "\n")
    return out


def convert_nemo_to_hf(nemo: str | Path, out: str | Path, family: Optional[str] = None,
                       overwrite: bool = False) -> Path:
    """Restore the .nemo ``nemo`` on CPU and export it as the HF checkpoint directory ``out``."""
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    model = EarlyExitGPTNeMoModel.restore_from(str(nemo), map_location="cpu").eval()
    return export_model(model, out, family=family, overwrite=overwrite)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """``scripts/convert_nemo_to_hf.py``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="convert_nemo_to_hf.py",
        description="Export an early-exit GPT .nemo (TP=PP=1) as a Hugging Face transformers checkpoint directory: "
                    "config.json, model.safetensors, tokenizer.json, tokenizer_config.json. Exit heads go to the "
                    f"side files {EXITS_WEIGHTS} and {EXITS_CONFIG} (read back by convert_hf_to_nemo.py). "
                    f"Families: {', '.join(FAMILIES)}.",
    )
    parser.add_argument("--nemo", required=True, type=Path, help="input .nemo")
    parser.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="HF family; default inferred from the architecture (gpt2, llama or qwen2)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args(argv)
    if not args.nemo.is_file():
        parser.error(f"--nemo {args.nemo}: no such file")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} exists and is not empty; pass --overwrite to write into it")
    try:
        path = convert_nemo_to_hf(args.nemo, args.out, family=args.family, overwrite=args.overwrite)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {path}")
    return path


__all__ = ["FAMILIES", "convert_nemo_to_hf", "export_model", "infer_family", "main"]
