"""Bubble filling, measured: PP=2 training with and without fill micro-batches, same wall-clock budget.

Both runs start from the same weights and see the same regular batches (stdlib corpus, tiny recipe
shape, both exits on stage 0). After each run's budget the validation exit losses are measured; the
"progress per second" of an exit is (initial - final validation loss) / seconds.

    python scripts/bench_bubble_fill.py [--seconds 90] [--fill 1]     # launches 2 processes itself

Last line: RESULT exit_progress_ratio=<fill/plain, mean over exits> steps_plain=<n> steps_fill=<m>
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=90.0, help="training budget per run")
    p.add_argument("--fill", type=int, default=1, help="fill micro-batches per step in the filled run")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--num-micro", type=int, default=4)
    p.add_argument("--val-batches", type=int, default=4)
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.fill < 1 or args.layers % 2:
        p.error("--seconds must be > 0, --fill >= 1 and --layers even (two pipeline stages)")
    return args


def relaunch(argv) -> None:
    """Run this script under torchrun with two processes (one pipeline stage each)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(Path(__file__).resolve()), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    sys.exit(subprocess.call(cmd, env=env))


def main(args: argparse.Namespace) -> None:
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.data import CorpusSpec, EETokenizer, build_datasets, train_tokenizer
    from nemo_ee.models import build_model
    from nemo_ee.parallel.initialize import initialize_distributed
    from nemo_ee.parallel.optimizer import OptimSettings, build_optimizer, wrap_ddp
    from nemo_ee.parallel.schedules import ExitLossRecorder, run_forward_backward

    cache = Path(os.path.expanduser(os.environ.get("NEMO_EE_CACHE", "~/.cache/nemo_ee")))
    cfg = EarlyExitConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8,
                          vocab_size=args.vocab, seq_length=args.seq, pipeline_model_parallel_size=2,
                          exit_layer_nums=[args.layers // 4, args.layers // 2], exit_loss_weights=[0.25, 0.5])
    initialize_distributed(1, 2, seed=1234, embedding_stages=cfg.embedding_stages)
    rank = torch.distributed.get_rank()
    spec = CorpusSpec()
    if rank == 0:  # train / tokenize once, then the other rank reads the cache
        build_datasets(spec, EETokenizer.from_file(train_tokenizer(spec, args.vocab, cache)), args.seq, cache)
    torch.distributed.barrier()
    tokenizer = EETokenizer.from_file(train_tokenizer(spec, args.vocab, cache))
    train, val = build_datasets(spec, tokenizer, args.seq, cache)

    def batch(ds, start: int, n: int) -> dict:
        items = [ds[(start + i) % len(ds)] for i in range(n)]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    weights = [0.25, 0.5]
    val_batches = [batch(val, i * args.micro, args.micro) for i in range(args.val_batches)]
    torch.manual_seed(1234)
    init_state = {k: v.clone() for k, v in build_model(cfg).state_dict().items() if isinstance(v, torch.Tensor)}

    def evaluate(ddp) -> dict:
        rec = ExitLossRecorder(cfg.num_exits)
        ddp.eval()
        with torch.no_grad():
            run_forward_backward([ddp], val_batches, weights, rec, ddp.config, args.seq, forward_only=True)
        ddp.train()
        return rec.reduce()

    results = {}
    for mode, fill in (("plain", 0), ("fill", args.fill)):
        model = build_model(cfg)
        model.load_state_dict(init_state, strict=False)
        ddp = wrap_ddp(model)
        opt = build_optimizer(ddp, OptimSettings(lr=1e-3, warmup_steps=0, decay_style="constant", min_lr=1e-3), 10**6)
        before = evaluate(ddp)
        steps, cursor, fill_cursor, start = 0, 0, len(train) // 2, time.perf_counter()
        while True:
            micro = [batch(train, cursor + i * args.micro, args.micro) for i in range(args.num_micro)]
            fills = [batch(train, fill_cursor + i * args.micro, args.micro) for i in range(fill)]
            cursor, fill_cursor = cursor + args.num_micro * args.micro, fill_cursor + fill * args.micro
            ddp.zero_grad_buffer()
            opt.zero_grad()
            run_forward_backward([ddp], micro, weights, ExitLossRecorder(cfg.num_exits), ddp.config, args.seq,
                                 fill_microbatches=fills or None)
            opt.step()
            steps += 1
            done = torch.tensor([time.perf_counter() - start >= args.seconds], dtype=torch.float32)
            torch.distributed.all_reduce(done)  # both stages stop at the same step
            if done.item() > 0:
                break
        seconds = time.perf_counter() - start
        after = evaluate(ddp)
        results[mode] = dict(steps=steps, seconds=seconds, before=before, after=after)

    if rank == 0:
        print(f"PP=2, {args.layers} layers, hidden {args.hidden}, seq {args.seq}, exits after layers "
              f"{cfg.exit_layer_nums} (both on stage 0), {args.num_micro} x {args.micro} sequences per step, "
              f"budget {args.seconds:.0f} s per run, {args.fill} fill micro-batches per step")
        print(f"{'run':<6}{'steps':>7}{'s/step':>9}  validation loss before -> after (exit@L ..., final)")
        rates = {}
        for mode, r in results.items():
            parts = []
            for i, layer in enumerate(cfg.exit_layer_nums):
                parts.append(f"exit@{layer} {r['before'][f'exit{i}']:.3f}->{r['after'][f'exit{i}']:.3f}")
                rates[(mode, i)] = (r["before"][f"exit{i}"] - r["after"][f"exit{i}"]) / r["seconds"]
            parts.append(f"final {r['before']['final']:.3f}->{r['after']['final']:.3f}")
            print(f"{mode:<6}{r['steps']:>7}{r['seconds'] / r['steps']:>9.2f}  " + ", ".join(parts))
        ratio = sum(rates[("fill", i)] / rates[("plain", i)] for i in range(cfg.num_exits)) / cfg.num_exits
        print(f"RESULT exit_progress_ratio={ratio:.3f} steps_plain={results['plain']['steps']} "
              f"steps_fill={results['fill']['steps']}")
        sys.stdout.flush()


if __name__ == "__main__":
    if "RANK" not in os.environ:
        parse()  # bad arguments fail here, before any process is started
        relaunch(sys.argv[1:])
    main(parse())
