"""Training-step cost of the exits: the tiny recipe with its exits vs the same backbone without them.

Both models take turns on the same batches in one process (warm-up excluded, median of --repeats),
through the same megatron schedule and optimizer as training. The predicted ratio is the FLOP ratio
(backbone + exit heads) / backbone, counting matmuls plus the softmax cross-entropy over the vocab.

    python scripts/bench_train_overhead.py [--repeats 15] [--warmup 3]

Last line: RESULT measured_ratio=<x> predicted_ratio=<y>
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def forward_flops_per_token(cfg, seq_length: int) -> tuple[float, float]:
    """(backbone, exits) forward FLOPs per token: 2 x matmul MACs, attention scores, vocab softmax+CE."""
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    kv = (cfg.num_query_groups or cfg.num_attention_heads) * (h // cfg.num_attention_heads)
    fc1 = 2 * f if cfg.activation == "swiglu" else f
    layer = 2 * (h * (h + 2 * kv) + h * h + h * fc1 + f * h) + 2 * 2 * seq_length * h  # + QK^T and AV
    head_out = 2 * h * v + 5 * v  # output projection + softmax/cross-entropy (max, sub, exp, sum, pick)
    backbone = cfg.num_layers * layer + head_out
    per_exit = head_out + (2 * (h * fc1 + f * h) if cfg.exit_mlp else 0) + (layer if cfg.exit_block else 0)
    return float(backbone), float(per_exit * cfg.num_exits)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "conf" / "ee_gpt_tiny.yaml"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    from tqdm import tqdm

    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.models import build_model
    from nemo_ee.models.losses import ExitWeightSchedule
    from nemo_ee.parallel.initialize import initialize_distributed
    from nemo_ee.parallel.optimizer import OptimSettings, build_optimizer, wrap_ddp
    from nemo_ee.parallel.schedules import ExitLossRecorder, run_forward_backward, split_microbatches

    recipe = OmegaConf.load(args.config).model
    arch = OmegaConf.to_container(recipe.arch, resolve=True)
    arch.setdefault("vocab_size", int(recipe.tokenizer.vocab_size))
    with_exits = EarlyExitConfig.from_dict(arch)
    without = EarlyExitConfig.from_dict({**arch, "exit_layer_nums": [], "exit_loss_weights": 1.0})
    initialize_distributed(1, 1, seed=1234)

    def make(cfg):
        model = build_model(cfg)
        ddp = wrap_ddp(model)
        opt = build_optimizer(ddp, OptimSettings(), max_steps=1000)
        return cfg, ddp, opt, ExitWeightSchedule.from_config(cfg).weights(0)

    runs = {"exits": make(with_exits), "plain": make(without)}
    s, gbs, mbs = with_exits.seq_length, int(recipe.global_batch_size), int(recipe.micro_batch_size)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, with_exits.vocab_size, (gbs, s + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(gbs, s),
             "position_ids": torch.arange(s).expand(gbs, s)}
    microbatches = split_microbatches(batch, mbs)

    def step(name: str) -> float:
        cfg, ddp, opt, weights = runs[name]
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        run_forward_backward([ddp], microbatches, weights, ExitLossRecorder(cfg.num_exits), ddp.config, s)
        opt.step()
        return time.perf_counter() - start

    times = {"exits": [], "plain": []}
    for i in tqdm(range(args.warmup + args.repeats), desc="train steps (exits / plain, alternating)"):
        for name in (("exits", "plain") if i % 2 else ("plain", "exits")):
            t = step(name)
            if i >= args.warmup:
                times[name].append(t)

    med = {k: statistics.median(v) for k, v in times.items()}
    backbone, exits = forward_flops_per_token(with_exits, s)
    predicted = (backbone + exits) / backbone
    measured = med["exits"] / med["plain"]
    print(f"threads={torch.get_num_threads()} global_batch={gbs} micro_batch={mbs} seq={s} "
          f"exits after layers {with_exits.exit_layer_nums} of {with_exits.num_layers}")
    print(f"median step: plain {med['plain'] * 1e3:.1f} ms, with exits {med['exits'] * 1e3:.1f} ms "
          f"(over {args.repeats} steps each, {args.warmup} warm-up steps excluded)")
    print(f"forward FLOPs/token: backbone {backbone / 1e6:.2f} M, exit heads {exits / 1e6:.2f} M")
    print(f"RESULT measured_ratio={measured:.3f} predicted_ratio={predicted:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
