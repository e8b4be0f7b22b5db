#!/usr/bin/env python
"""EE-Tuning vs full fine-tuning: step time and memory, side by side on one model and batch (CPU-friendly).

Random weights, TP=PP=1. Default shape: 16 layers, hidden 512, vocab 8192, seq 512, exits at layers 4 and 8.

- EE-Tuning step: backbone frozen, run under no_grad up to the last exit (layer 8); exit heads fwd+bwd;
  AdamW over the exit parameters only (nemo_ee.tuning.ee_tune).
- Full fine-tuning step: whole model, final + exit losses, full backward, AdamW over every parameter.
Steps alternate (EE, full, EE, full, ...); the first ``--warmup`` pairs are excluded; medians are reported.

Memory (no CUDA here, and tracemalloc does not see torch's allocator) is an explicit byte count
(nemo_ee.tuning.memory):
  resident parameters (EE-Tuning: only embedding + layers up to the last exit + exits, i.e. a truncated
  backbone as built by ``build_truncated_model``; full: all) + gradients of trainable parameters
  + AdamW state (2 x trainable) + activations saved for backward (every tensor autograd saves, counted
  through torch.autograd.graph.saved_tensors_hooks, deduplicated by storage, parameters excluded).
Transient forward buffers that are freed before backward are not counted for either side.

Predicted time ratio from FLOPs: per token, a layer's forward is 24h^2 + 4sh, an output projection 2hV;
EE = 8 layers fwd + exit heads fwd+bwd (3x); full = 3 x (16 layers + final and exit projections).

Last line: ``RESULT time_ratio=<t> predicted_time_ratio=<p> memory_ratio=<m>``.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--exits", type=str, default=None, help="comma-separated exit layers (default: L/4, L/2)")
    p.add_argument("--repeats", type=int, default=5, help="measured steps of each kind")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps of each kind")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.models import build_model
    from nemo_ee.parallel.initialize import initialize_distributed
    from nemo_ee.tuning.ee_tune import exit_tuning_loss, freeze_backbone
    from nemo_ee.tuning.memory import SavedTensorCounter, step_flops_per_token, step_memory

    L, h, V, s, b = args.layers, args.hidden, args.vocab, args.seq, args.batch
    exits = [int(x) for x in args.exits.split(",")] if args.exits else sorted({max(1, L // 4), max(1, L // 2)})
    initialize_distributed(1, 1, seed=1234)
    cfg = EarlyExitConfig(num_layers=L, hidden_size=h, num_attention_heads=args.heads, vocab_size=V, seq_length=s,
                          exit_layer_nums=exits, transformer_impl="local")
    model = build_model(cfg).train()
    all_params = list(model.parameters())
    exit_params = [p for n, p in model.named_parameters() if n.startswith("exits.")]
    weights = [1.0] * len(exits)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (b, s), generator=g)
    labels = torch.randint(0, V, (b, s), generator=g)
    pos = torch.arange(s).expand(b, s)
    mask = torch.ones(b, s)
    full_opt = torch.optim.AdamW(all_params, lr=1e-5)
    ee_opt = torch.optim.AdamW(exit_params, lr=1e-5)

    def ee_step(counter=None):
        freeze_backbone(model)
        ee_opt.zero_grad(set_to_none=True)
        with counter.hooks() if counter else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss, _ = exit_tuning_loss(model, tokens, labels, mask, weights, pos)
        loss.backward()
        ee_opt.step()
        ee_opt.zero_grad(set_to_none=True)

    def full_step(counter=None):
        for p in all_params:
            p.requires_grad_(True)
        full_opt.zero_grad(set_to_none=True)
        with counter.hooks() if counter else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = model(tokens, pos, None, labels=labels)
            n = mask.sum()
            loss = out.output.float().sum() / n + sum(w * e.float().sum() / n for w, e in zip(weights, out.exits.values()))
        loss.backward()
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)

    # ---- memory (one counted step of each kind; Adam state exists after it)
    ee_counter, full_counter = SavedTensorCounter(model), SavedTensorCounter(model)
    ee_step(ee_counter)
    full_step(full_counter)
    deepest = max(cfg.exit_point(x) for x in exits)
    not_built = (f"decoder.layers.{i}." for i in range(deepest, L))
    skipped = tuple(not_built) + ("decoder.final_layernorm.", "output_layer.")
    ee_resident = [p for n, p in model.named_parameters() if not n.startswith(skipped)]
    ee_mem = step_memory(ee_resident, exit_params, ee_counter.nbytes)
    full_mem = step_memory(all_params, all_params, full_counter.nbytes)

    # ---- time (alternating)
    times = {"ee": [], "full": []}
    for i in range(args.warmup + args.repeats):
        for kind, fn in (("ee", ee_step), ("full", full_step)):
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - t0)
    t_ee, t_full = statistics.median(times["ee"]), statistics.median(times["full"])

    # ---- FLOPs prediction (per token)
    ee_flops, full_flops = step_flops_per_token(L, h, s, V, exits, deepest)

    mb = lambda x: f"{x / 2**20:.1f} MiB"  # noqa: E731
    print(f"shape: layers={L} hidden={h} heads={args.heads} vocab={V} seq={s} batch={b} exits={exits} "
          f"threads={torch.get_num_threads()}")
    print(f"EE-Tuning step: median {t_ee * 1e3:.1f} ms over {len(times['ee'])} "
          f"(all: {', '.join(f'{t * 1e3:.0f}' for t in times['ee'])})")
    print(f"full FT step:   median {t_full * 1e3:.1f} ms over {len(times['full'])} "
          f"(all: {', '.join(f'{t * 1e3:.0f}' for t in times['full'])})")
    print("memory method: resident params + grads of trainable params + AdamW state (2x trainable) + tensors "
          "saved for backward (saved_tensors_hooks, by storage, params excluded); EE resident params exclude "
          "the layers after the last exit, the final norm and output layer (truncated backbone)")
    for name, mem in (("EE-Tuning", ee_mem), ("full FT", full_mem)):
        print(f"{name} memory: total {mb(sum(mem.values()))} = " + " + ".join(f"{k} {mb(v)}" for k, v in mem.items()))
    print(f"FLOPs per token: EE {ee_flops / 1e6:.1f} M, full {full_flops / 1e6:.1f} M")
    time_ratio = t_ee / t_full
    predicted = ee_flops / full_flops
    memory_ratio = sum(ee_mem.values()) / sum(full_mem.values())
    print(f"RESULT time_ratio={time_ratio:.3f} predicted_time_ratio={predicted:.3f} memory_ratio={memory_ratio:.3f}")


if __name__ == "__main__":
    main()
