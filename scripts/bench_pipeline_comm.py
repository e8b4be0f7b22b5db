"""Pipeline point-to-point traffic and step time of the exits: PP=2, with exits vs the same model without.

Two processes (pipeline stages) train the tiny recipe's model (conf/ee_gpt_tiny.yaml: 8 layers,
hidden 256, exits after layers 2 and 4, i.e. both on stage 0 of 2) and the same backbone without
exits, taking turns on the same synthetic batches, through megatron's 1F1B schedule, DDP and
optimizer as in training. Every point-to-point message megatron issues is counted by wrapping
``torch.distributed.batch_isend_irecv`` (megatron's default batched path) and megatron's unbatched
``_p2p_ops``: messages (sends; each has its matching receive) and bytes, per training step, summed
over both ranks. Step times: median over ``--repeats`` steps each, warm-up excluded, alternating.

    python scripts/bench_pipeline_comm.py [--repeats 10] [--warmup 2] [--exit-layers 2 6] [--tiny]

Without torchrun it launches itself with ``torch.distributed.run --nproc_per_node 2``.
Last line: RESULT p2p_messages_with_exits=<n> p2p_messages_without_exits=<m> step_time_ratio=<r>
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = dict(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "conf" / "ee_gpt_tiny.yaml"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--exit-layers", type=int, nargs="+", default=None,
                        help="exit after these layers (default: the recipe's, 2 and 4: both on stage 0)")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer, hidden-32 model (for tests)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def relaunch_under_torchrun(argv: list) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(Path(__file__).resolve()), *argv]
    return subprocess.run(cmd, env=env).returncode


class P2PCounter:
    """Counts the point-to-point messages megatron's pipeline schedule issues, and their bytes."""

    def __init__(self) -> None:
        self.sends = self.recvs = self.send_bytes = 0
        self.active = False

    def _count(self, is_send: bool, tensor) -> None:
        if not self.active:
            return
        if is_send:
            self.sends += 1
            self.send_bytes += tensor.numel() * tensor.element_size()
        else:
            self.recvs += 1

    def install(self) -> None:
        import torch.distributed as dist
        from megatron.core.pipeline_parallel import p2p_communication

        batch_isend_irecv = dist.batch_isend_irecv

        def counting_batch_isend_irecv(ops):
            for op in ops:
                self._count(op.op is dist.isend or getattr(op.op, "__name__", "") == "isend", op.tensor)
            return batch_isend_irecv(ops)

        dist.batch_isend_irecv = counting_batch_isend_irecv
        p2p_ops = p2p_communication._p2p_ops

        def counting_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, **kw):
            for tensor, is_send in ((tensor_send_prev, True), (tensor_recv_prev, False),
                                    (tensor_send_next, True), (tensor_recv_next, False)):
                if tensor is not None:
                    self._count(is_send, tensor)
            return p2p_ops(tensor_send_prev=tensor_send_prev, tensor_recv_prev=tensor_recv_prev,
                           tensor_send_next=tensor_send_next, tensor_recv_next=tensor_recv_next, **kw)

        p2p_communication._p2p_ops = counting_p2p_ops

    def take(self) -> tuple[int, int, int]:
        out = (self.sends, self.recvs, self.send_bytes)
        self.sends = self.recvs = self.send_bytes = 0
        return out


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.models import build_model
    from nemo_ee.models.losses import ExitWeightSchedule
    from nemo_ee.parallel.initialize import initialize_distributed
    from nemo_ee.parallel.optimizer import OptimSettings, build_optimizer, wrap_ddp
    from nemo_ee.parallel.schedules import ExitLossRecorder, run_forward_backward, split_microbatches

    recipe = OmegaConf.load(args.config).model
    arch = OmegaConf.to_container(recipe.arch, resolve=True)
    arch.setdefault("vocab_size", int(recipe.tokenizer.vocab_size))
    arch.update(pipeline_model_parallel_size=2, tensor_model_parallel_size=1)
    if args.tiny:
        arch.update(TINY_ARCH, vocab_size=384, exit_layer_nums=[1, 3], exit_loss_weights=[0.25, 0.5])
    if args.exit_layers:
        arch.update(exit_layer_nums=args.exit_layers, exit_loss_weights=[0.5] * len(args.exit_layers))
    arch.update(exit_loss_init_weights=None, exit_loss_warmup_iters=0)
    with_exits = EarlyExitConfig.from_dict(arch)
    without = EarlyExitConfig.from_dict({**arch, "exit_layer_nums": [], "exit_loss_weights": 1.0})
    gbs, mbs = (4, 2) if args.tiny else (int(recipe.global_batch_size), int(recipe.micro_batch_size))

    initialize_distributed(1, 2, seed=1234)
    if dist.get_world_size() != 2:
        raise SystemExit(f"run with 2 processes (pipeline parallel 2), not {dist.get_world_size()}")
    rank = dist.get_rank()
    counter = P2PCounter()
    counter.install()

    def make(cfg):
        model = build_model(cfg)
        ddp = wrap_ddp(model)
        opt = build_optimizer(ddp, OptimSettings(), max_steps=1000)
        ddp.config.grad_scale_func = opt.optimizer.scale_loss
        return cfg, ddp, opt, ExitWeightSchedule.from_config(cfg).weights(0), model

    runs = {"exits": make(with_exits), "plain": make(without)}
    s = with_exits.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, with_exits.vocab_size, (gbs, s + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(gbs, s),
             "position_ids": torch.arange(s).expand(gbs, s)}
    microbatches = split_microbatches(batch, mbs)

    def step(name: str) -> tuple[float, tuple[int, int, int]]:
        cfg, ddp, opt, weights, _ = runs[name]
        dist.barrier()
        counter.take()
        counter.active = True
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        run_forward_backward([ddp], microbatches, weights, ExitLossRecorder(cfg.num_exits), ddp.config, s)
        opt.step()
        dist.barrier()
        elapsed = time.perf_counter() - start
        counter.active = False
        traffic = torch.tensor(counter.take(), dtype=torch.float64)
        dist.all_reduce(traffic)  # both stages' messages
        return elapsed, tuple(int(v) for v in traffic.tolist())

    times = {"exits": [], "plain": []}
    traffic: dict = {"exits": set(), "plain": set()}
    for i in range(args.warmup + args.repeats):
        for name in (("exits", "plain") if i % 2 else ("plain", "exits")):
            elapsed, t = step(name)
            traffic[name].add(t)
            if i >= args.warmup:
                times[name].append(elapsed)

    if rank == 0:
        for name in traffic:
            if len(traffic[name]) != 1:
                raise RuntimeError(f"p2p traffic of '{name}' varies between steps: {sorted(traffic[name])}")
        (n_send, n_recv, n_bytes), (m_send, m_recv, m_bytes) = traffic["exits"].pop(), traffic["plain"].pop()
        med = {k: statistics.median(v) for k, v in times.items()}
        stage0 = [with_exits.exit_layer_nums[i] for i in runs["exits"][4].local_exit_indices]
        print(f"PP=2 (gloo/{'cuda' if torch.cuda.is_available() else 'cpu'}), {with_exits.num_layers} layers, "
              f"hidden {with_exits.hidden_size}, seq {s}, global batch {gbs}, micro batch {mbs} "
              f"({len(microbatches)} micro-batches per step), threads={torch.get_num_threads()}")
        print(f"exits after layers {with_exits.exit_layer_nums}: {stage0} on stage 0, "
              f"{[x for x in with_exits.exit_layer_nums if x not in stage0]} on stage 1")
        print(f"per step, both ranks: with exits {n_send} sends / {n_recv} receives, {n_bytes} bytes sent; "
              f"without exits {m_send} sends / {m_recv} receives, {m_bytes} bytes sent")
        print(f"p2p_bytes_with_exits={n_bytes} p2p_bytes_without_exits={m_bytes}")
        print(f"median step: without exits {med['plain'] * 1e3:.1f} ms, with exits {med['exits'] * 1e3:.1f} ms "
              f"(over {args.repeats} steps each, {args.warmup} warm-up steps excluded, alternating)")
        print(f"RESULT p2p_messages_with_exits={n_send} p2p_messages_without_exits={m_send} "
              f"step_time_ratio={med['exits'] / med['plain']:.3f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit(relaunch_under_torchrun(argv))
    worker(args)


if __name__ == "__main__":
    main()
