"""Add exit heads to a trained early-exit GPT (EE-Tuning, step 1): a new model, backbone copied bit-exactly.

Design (see also ``scripts/add_exits.py``):

* The new model's exits are exactly the requested ones: exits the input model already had are
  **replaced** (dropped), because the head layout (position, norm, MLP, block) is one setting for
  all exits and per-exit loss lists would no longer line up. Per-exit loss fields given as lists
  are reset to their defaults; scalars are kept. ``tie_exit_output`` is always False so each exit
  has its own output weight to tune.
* ``init="copy"`` (default) starts each exit from the backbone's own top:
  norm <- ``decoder.final_layernorm``; output projection <- ``output_layer.weight`` (or the word
  embedding when the backbone ties them); residual MLP (``mlp_norm`` + ``mlp``) <- the
  ``pre_mlp_layernorm`` + ``mlp`` of the *source layer*, the last backbone layer run before the
  exit reads the hidden state: layer ``L`` for ``post`` at ``L``, layer ``L-1`` for ``pre`` at ``L``
  (so ``pre`` at ``L`` and ``post`` at ``L-1`` start identically), layer 1 for ``pre`` at 1
  (the embedding output); exit block <- the last backbone layer. An exit with only a copied norm
  and output after the last layer therefore reproduces the final logits exactly.
* ``init="random"``: 2-D weights normal(0, std); the output-side projections (attention
  ``linear_proj`` and MLP ``linear_fc2``) use megatron's scaled init std / sqrt(2 * num_layers)
  (``scaled_init_method_normal``, ``TransformerConfig.output_layer_init_method``); the exit output
  layer normal(0, std); norm weights 1; every bias 0. Seeded by ``seed`` (own generator).
* Whole model on one rank only (TP = PP = 1): a .nemo holds the whole model; under tensor or
  pipeline parallelism this raises.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from omegaconf import OmegaConf

from nemo_ee.atomic import save_nemo
from nemo_ee.config import EarlyExitConfig

# Per-exit fields whose list values are tied to the old exit list (reset when they are lists).
_PER_EXIT_FIELDS = ("exit_loss_init_weights", "exit_loss_warmup_iters", "exit_loss_warmup_style",
                    "exit_logit_temperature", "exit_dynamic_token_weight")
_SCALED = ("linear_proj", "linear_fc2")  # output-side projections: megatron's scaled init


def exit_layers_from_fractions(fractions: Sequence[float], num_layers: int) -> list[int]:
    """Layer numbers round(fraction * num_layers) (halves round up); ValueError outside 1..L or on duplicates."""
    layers = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
            raise ValueError(f"exit fraction {f!r} is not a number")
        layer = int(math.floor(f * num_layers + 0.5))
        if not 1 <= layer <= num_layers:
            raise ValueError(
                f"exit fraction {f} maps to layer {layer}, outside 1..{num_layers} (num_layers={num_layers})"
            )
        if layer in layers:
            raise ValueError(f"exit fractions {list(fractions)} map to layers {[*layers, layer]}: layer {layer} repeats")
        layers.append(layer)
    return layers


def _source_layer(ee: EarlyExitConfig, layer: int) -> int:
    """1-based backbone layer whose MLP initialises the exit MLP at ``layer`` (copy init)."""
    return max(ee.exit_point(layer), 1)


def _tokenizer_entries(model) -> dict:
    """The model's tokenizer files written where they outlive this call (a restored model's artifacts live in
    a deleted temp dir); the ``tokenizer`` config entries naming them."""
    return model.tokenizer.save_files(Path(tempfile.mkdtemp(prefix="nemo_ee_tokenizer_")))


def _new_config(model, layers: list[int], exit_position: str, exit_norm: bool, exit_mlp: bool, exit_block: bool,
                exit_loss_weights) -> "OmegaConf":
    cfg = OmegaConf.to_container(model.cfg, resolve=True)
    arch = cfg["arch"]
    defaults = {f.name: f.default for f in dataclasses.fields(EarlyExitConfig)}
    for name in _PER_EXIT_FIELDS:
        if isinstance(arch.get(name), (list, tuple)):
            arch[name] = defaults[name]
    arch.update(
        exit_layer_nums=list(layers), exit_position=exit_position, exit_norm=bool(exit_norm),
        exit_mlp=bool(exit_mlp), exit_block=bool(exit_block), tie_exit_output=False,
        exit_loss_weights=(list(exit_loss_weights) if isinstance(exit_loss_weights, (list, tuple))
                           else exit_loss_weights),
    )
    cfg["tokenizer"].update(_tokenizer_entries(model))
    cfg.pop("target", None)
    return OmegaConf.create(cfg)


@torch.no_grad()
def _copy_module(dst: torch.nn.Module, src: torch.nn.Module, what: str) -> None:
    src_params = dict(src.named_parameters())
    for name, param in dst.named_parameters():
        if name not in src_params or src_params[name].shape != param.shape:
            raise ValueError(f"cannot copy-initialise {what}: source has no parameter {name} of shape {tuple(param.shape)}")
        param.copy_(src_params[name])


@torch.no_grad()
def _random_init(module: torch.nn.Module, std: float, num_layers: int, generator: torch.Generator) -> None:
    scaled = std / math.sqrt(2.0 * num_layers)
    for name, param in module.named_parameters():
        if param.dim() == 1:
            param.fill_(0.0 if name.endswith("bias") else 1.0)  # biases 0, norm weights (incl. fused TE norms) 1
            continue
        leaf = name.split(".")
        sigma = scaled if any(part in _SCALED for part in leaf) else std
        param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, sigma, generator=generator))


def add_exits(
    model,
    layers: Sequence[int],
    *,
    exit_position: str = "post",
    exit_norm: bool = True,
    exit_mlp: bool = False,
    exit_block: bool = False,
    exit_loss_weights: Union[float, Sequence[float]] = 1.0,
    init: str = "copy",
    init_std: float = 0.02,
    seed: int = 1234,
):
    """A new EarlyExitGPTNeMoModel: ``model``'s backbone and tokenizer, with exits at ``layers`` (1-based).

    Existing exits of ``model`` are replaced. See the module docstring for the initialisation rules.
    """
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    ee = model.ee_config
    if ee.tensor_model_parallel_size * ee.pipeline_model_parallel_size > 1:
        raise ValueError(
            f"add_exits needs the whole model on one rank (TP=PP=1), got TP={ee.tensor_model_parallel_size} "
            f"PP={ee.pipeline_model_parallel_size}: reshard to TP=PP=1 first (scripts/reshard.py)"
        )
    if init not in ("copy", "random"):
        raise ValueError(f"init={init!r} is not one of ['copy', 'random']")
    if not (isinstance(init_std, (int, float)) and init_std > 0):
        raise ValueError(f"init_std={init_std!r} must be > 0")
    layers = list(layers)
    if not layers:
        raise ValueError("no exit layers given")
    if isinstance(exit_loss_weights, (list, tuple)) and len(exit_loss_weights) == 1:
        exit_loss_weights = exit_loss_weights[0]
    if isinstance(exit_loss_weights, (list, tuple)):
        if len(exit_loss_weights) != len(layers):
            raise ValueError(f"{len(exit_loss_weights)} exit loss weights for {len(layers)} exits {layers}")
        order = sorted(range(len(layers)), key=lambda i: layers[i])
        layers, exit_loss_weights = [layers[i] for i in order], [exit_loss_weights[i] for i in order]
    else:
        layers = sorted(layers)
    new_cfg = _new_config(model, layers, exit_position, exit_norm, exit_mlp, exit_block, exit_loss_weights)
    EarlyExitConfig.from_dict({"vocab_size": int(new_cfg.tokenizer.vocab_size), **new_cfg.arch})  # fail early

    new = EarlyExitGPTNeMoModel(new_cfg)
    src, dst = model.model, new.model
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith("exits.")}
    result = dst.load_state_dict(backbone, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("exits.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"backbone mismatch: missing {missing}, unexpected {result.unexpected_keys}")

    nee = new.ee_config
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for key, head in dst.exits.items():
            layer = nee.exit_layer_nums[int(key)]
            if init == "random":
                _random_init(head, float(init_std), nee.num_layers, generator)
                continue
            if head.block is not None:
                _copy_module(head.block, src.decoder.layers[-1], f"the exit block at layer {layer}")
            if head.mlp is not None:
                source = src.decoder.layers[_source_layer(nee, layer) - 1]
                _copy_module(head.mlp_norm, source.pre_mlp_layernorm, f"the exit MLP norm at layer {layer}")
                _copy_module(head.mlp, source.mlp, f"the exit MLP at layer {layer}")
            if head.norm is not None:
                _copy_module(head.norm, src.decoder.final_layernorm, f"the exit norm at layer {layer}")
            out = src.output_layer.weight if src.output_layer.weight is not None else src.shared_embedding_or_output_weight()
            head.output_layer.weight.copy_(out)
    return new


# ---------------------------------------------------------------------- command line
def read_nemo_config(path: Union[str, Path]) -> "OmegaConf":
    """The model config inside a .nemo (a tar archive), without restoring the weights."""
    import tarfile

    with tarfile.open(str(path), "r:*") as tar:
        for member in tar.getmembers():
            if Path(member.name).name == "model_config.yaml" and member.isfile():
                return OmegaConf.create(tar.extractfile(member).read().decode("utf-8"))
    raise ValueError(f"{path} has no model_config.yaml")


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="add_exits.py",
        description="Add exit heads to a trained early-exit GPT .nemo (EE-Tuning). The backbone and tokenizer are "
                    "copied bit-exactly; existing exits are replaced by the requested ones; exit output weights are "
                    "untied. Single process, TP=PP=1.",
    )
    parser.add_argument("--in", dest="src", required=True, type=Path, help="input .nemo (written by save_to)")
    parser.add_argument("--out", dest="dst", required=True, type=Path, help="output .nemo")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--exit-layers", type=int, nargs="+", metavar="L", help="1-based backbone layer numbers")
    where.add_argument("--exit-fractions", type=float, nargs="+", metavar="F",
                       help="fractions of the depth: layer = round(F * num_layers), halves up")
    parser.add_argument("--exit-position", choices=("post", "pre"), default="post",
                        help="read the layer's output (post) or input (pre)")
    parser.add_argument("--exit-norm", action=argparse.BooleanOptionalAction, default=True, help="norm before the output projection")
    parser.add_argument("--exit-mlp", action=argparse.BooleanOptionalAction, default=False, help="residual MLP in the head")
    parser.add_argument("--exit-block", action=argparse.BooleanOptionalAction, default=False, help="a transformer layer in the head")
    parser.add_argument("--exit-loss-weights", type=float, nargs="+", metavar="W", default=[1.0],
                        help="one weight for all exits or one per exit (in the order of the exit layers)")
    parser.add_argument("--random-init", action="store_true",
                        help="random heads (normal(0, std), scaled output projections) instead of copies of the top layers")
    parser.add_argument("--init-std", type=float, default=0.02, help="std of the random init")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the random init")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None):
    """Validated arguments plus the exit layers; ``parser.error`` (exit 2) before any model is loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    src, dst = args.src, args.dst
    if src.suffix != ".nemo":
        parser.error(f"--in {src}: not a .nemo file")
    if not src.is_file():
        parser.error(f"--in {src}: no such file")
    if dst.suffix != ".nemo":
        parser.error(f"--out {dst}: must end in .nemo")
    if dst.resolve() == src.resolve():
        parser.error("--out must differ from --in")
    if dst.exists() and not args.overwrite:
        parser.error(f"--out {dst} exists; pass --overwrite to replace it")
    if dst.exists() and not dst.is_file():
        parser.error(f"--out {dst} exists and is not a file")
    if args.init_std <= 0 or not math.isfinite(args.init_std):
        parser.error(f"--init-std {args.init_std} must be > 0")
    if any(w < 0 or not math.isfinite(w) for w in args.exit_loss_weights):
        parser.error(f"--exit-loss-weights {args.exit_loss_weights} must be >= 0")
    try:
        cfg = read_nemo_config(src)
        num_layers = int(cfg.arch.get("num_layers", EarlyExitConfig.num_layers))
        tp = int(cfg.arch.get("tensor_model_parallel_size", 1))
        pp = int(cfg.arch.get("pipeline_model_parallel_size", 1))
    except Exception as exc:  # noqa: BLE001 - any unreadable archive is a bad --in
        parser.error(f"--in {src}: not a readable .nemo ({exc})")
    if tp * pp > 1:
        parser.error(f"--in {src} is configured for TP={tp} PP={pp}; add_exits runs single-process at TP=PP=1")
    if args.exit_fractions is not None:
        try:
            layers = exit_layers_from_fractions(args.exit_fractions, num_layers)
        except ValueError as exc:
            parser.error(f"--exit-fractions: {exc}")
    else:
        layers = list(args.exit_layers)
        bad = [n for n in layers if not 1 <= n <= num_layers]
        if bad:
            parser.error(f"--exit-layers {bad} outside 1..{num_layers} (the model has {num_layers} layers)")
        dup = sorted({n for n in layers if layers.count(n) > 1})
        if dup:
            parser.error(f"--exit-layers repeats layer(s) {dup}")
    if len(args.exit_loss_weights) not in (1, len(layers)):
        parser.error(f"--exit-loss-weights: {len(args.exit_loss_weights)} weights for {len(layers)} exits {layers}")
    args.layers = layers
    return args


def main(argv: Optional[Sequence[str]] = None) -> Path:
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    args = parse_args(argv)
    model = EarlyExitGPTNeMoModel.restore_from(str(args.src), map_location="cpu")
    weights = args.exit_loss_weights
    new = add_exits(
        model, args.layers, exit_position=args.exit_position, exit_norm=args.exit_norm, exit_mlp=args.exit_mlp,
        exit_block=args.exit_block, exit_loss_weights=weights[0] if len(weights) == 1 else weights,
        init="random" if args.random_init else "copy", init_std=args.init_std, seed=args.seed,
    )
    save_nemo(new, args.dst)
    ee = new.ee_config
    print(f"wrote {args.dst}: exits at layers {ee.exit_layer_nums} ({ee.exit_position}; norm={ee.exit_norm} "
          f"mlp={ee.exit_mlp} block={ee.exit_block}; init={'random' if args.random_init else 'copy'}), "
          f"loss weights {ee.per_exit('exit_loss_weights')}")
    return args.dst
