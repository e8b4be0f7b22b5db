"""Rank worker: megatron-core's own GPTModel (llama-like, local spec) at TP=2, saved with dist_checkpointing,
and its own TP=2 logits on the tokens the import test uses.

    python -m torch.distributed.run --nproc_per_node 2 tests/checkpoint/_megatron_tp_worker.py OUT_DIR

Writes OUT_DIR/ckpt (one shard file per rank) and OUT_DIR/logits.pt (rank 0, vocab-gathered).
"""
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    import torch.distributed as dist

    import nemo_ee.models  # noqa: F401  (the CPU shim, before megatron builds anything)
    from megatron.core import dist_checkpointing
    from nemo_ee.checkpoint.dist import sync_save_strategy
    from nemo_ee.parallel.initialize import initialize_distributed
    from tests.checkpoint.test_megatron_import import TOKENS, _gpt

    initialize_distributed(2, 1, seed=1234)
    gpt = _gpt("llama")
    ckpt = out / "ckpt"
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(gpt.sharded_state_dict(), str(ckpt), sharded_strategy=sync_save_strategy())
    tokens = TOKENS()
    with torch.no_grad():
        logits = gpt(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, runtime_gather_output=True)
    if dist.get_rank() == 0:
        torch.save(logits, out / "logits.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
