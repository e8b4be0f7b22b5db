"""Offline conversion of a distributed checkpoint between TP/PP layouts (``scripts/reshard.py``).

Run with exactly ``tp * pp`` processes (torchrun, or one plain process for TP=PP=1): every rank builds
its stage of the model at the target layout from the checkpoint's ``nemo_ee_config.json``, loads the
source checkpoint (saved at any layout; megatron's ``dist_checkpointing`` reshards on load) and saves
it to the target folder. Tensor values are copied, never recomputed, so they are bit-identical.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

from nemo_ee.checkpoint.dist import CONFIG_FILE, is_checkpoint, read_config
from nemo_ee.config import EarlyExitConfig


def world_size_from_env() -> int:
    """The launch's world size (torchrun's ``WORLD_SIZE``; 1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``scripts/reshard.py``."""
    parser = argparse.ArgumentParser(
        description="Convert an early-exit GPT distributed checkpoint to another tensor/pipeline parallel layout. "
        "Run as: torchrun --nproc_per_node TP*PP scripts/reshard.py --in SRC --out DST --tp TP --pp PP",
    )
    parser.add_argument("--in", dest="src", required=True, type=Path, help="source checkpoint folder (any layout)")
    parser.add_argument("--out", dest="dst", required=True, type=Path, help="target checkpoint folder (replaced atomically)")
    parser.add_argument("--tp", type=int, default=1, help="target tensor-model-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="target pipeline-model-parallel size")
    parser.add_argument("--seed", type=int, default=1234, help="seed for the (overwritten) initial weights")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> tuple:
    """Validated arguments and the target EarlyExitConfig; ``parser.error`` (exit 2) before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    world = world_size_from_env() if world_size is None else world_size
    if args.tp < 1 or args.pp < 1:
        parser.error(f"--tp {args.tp} and --pp {args.pp} must be >= 1")
    if args.tp * args.pp != world:
        parser.error(
            f"--tp {args.tp} x --pp {args.pp} = {args.tp * args.pp} processes needed, but the world size is {world}: "
            f"run with torchrun --nproc_per_node {args.tp * args.pp}"
        )
    if not args.src.is_dir():
        parser.error(f"--in {args.src}: no such checkpoint folder")
    if not is_checkpoint(args.src):
        parser.error(
            f"--in {args.src}: not a complete nemo_ee distributed checkpoint (needs metadata.json and {CONFIG_FILE})"
        )
    if args.src.resolve() == args.dst.resolve():
        parser.error("--out must differ from --in (the source is read while the target is written)")
    if args.dst.exists() and not args.dst.is_dir():
        parser.error(f"--out {args.dst} exists and is not a folder")
    if args.dst.exists() and any(args.dst.iterdir()) and not is_checkpoint(args.dst):
        parser.error(f"--out {args.dst} is a non-empty folder that is not a checkpoint; refusing to replace it")
    try:
        cfg = read_config(args.src, tp=args.tp, pp=args.pp)
    except ValueError as exc:
        parser.error(f"the checkpoint's model cannot use --tp {args.tp} --pp {args.pp}: {exc}")
    return args, cfg


def reshard(src: Path, dst: Path, cfg: EarlyExitConfig, seed: int = 1234) -> None:
    """Load ``src`` into this rank's stage of ``cfg``'s layout and save it to ``dst`` (collective)."""
    import nemo_ee.models  # noqa: F401  (CPU shim before megatron runs)
    from nemo_ee.checkpoint.dist import load_model, save_model
    from nemo_ee.models import build_model
    from nemo_ee.parallel.initialize import initialize_distributed

    kwargs = {"embedding_stages": cfg.embedding_stages} if hasattr(cfg, "embedding_stages") else {}
    initialize_distributed(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed, **kwargs)
    model = build_model(cfg)
    load_model(model, src)
    save_model(model, dst)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``scripts/reshard.py``: reshard, report on rank 0, tear the process group down."""
    args, cfg = parse_args(argv)
    reshard(args.src, args.dst, cfg, args.seed)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"resharded {args.src} -> {args.dst} (tp={args.tp}, pp={args.pp})", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
