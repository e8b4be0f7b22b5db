#!/usr/bin/env python
"""Early-exit decoding benchmark: a threshold sweep side by side with full-model decoding (EE-LLM Fig. 9).

    python scripts/bench_decode.py                    # train + cache the benchmark model (once), then measure
    python scripts/bench_decode.py --nemo my.nemo     # measure an existing early-exit .nemo
    python scripts/bench_decode.py --quick            # a tiny model and a short sweep (minutes; a smoke test)

Model. Without --nemo an early-exit GPT is trained once with the project's own training path
(nemo_ee.train.pretrain on conf/ee_gpt_tiny.yaml plus the overrides printed at start: 16 layers,
hidden 256, exits after layers 4 and 8 with loss weight 0.5 each, 600 steps of 8 x 128 tokens of the
embedded stdlib corpus, its 512-token BPE; about 25 minutes with one thread on a busy 2-core machine)
and cached as $NEMO_EE_CACHE/bench_decode/<config hash>/model.nemo (default cache ~/.cache/nemo_ee);
later runs reuse it. The vocabulary is small on purpose: every exit evaluation pays a vocabulary-wide
projection, which at 4096 tokens costs about a layer of this width.

Where a decode step's time goes is measured first and printed: the step time at each exit depth and
at full depth (batch 1, timed round-robin), the time per backbone layer (slope over depth), the fixed
per-step part (embedding, one head, bookkeeping; intercept), and how much of a layer is dispatch and
Python rather than arithmetic (the per-layer time of the same architecture at hidden 64). A cProfile
of one early-exit generation closes the run.

Prompts: the first --prompt-len tokens of evenly spaced windows of the model's validation split.
Decoding is greedy, --new-tokens tokens per prompt, policy max_prob, no stop tokens.

Sweep (one row per threshold, 1.0 down to 0.0 in steps of --step): each prompt is decoded with the
early-exit rule and with the full model, alternately (EE, full, full, EE, ...) to cancel drift;
times are medians over prompts of per-prompt wall time (prefill included, identical for both);
--warmup untimed pairs run first. Columns:
  speedup        full seconds / early-exit seconds (median of per-prompt ratios)
  mean_depth     mean backbone layers a generated token went through (final layer = L)
  ideal_speedup  L / mean_depth;  efficiency = speedup / ideal_speedup
  agreement      share of early-exit tokens equal to the full model's greedy token given the same
                 prefix (the early-exit output, teacher-forced through the full model)
  agreement_prefix  share of tokens before the early-exit output first differs from full greedy
  val_ppl        teacher-forced validation perplexity of early-exit predictions: on --val-windows
                 windows of the validation split, each position's distribution is taken from the exit
                 the rule picks at that position (first exit, shallowest first, whose confidence passes
                 the threshold; else the final layer) and exp(mean NLL of the true next token) is
                 reported. With KV recomputation, hidden states equal the full model's, so this is
                 exactly the perplexity of the early-exit decoder on that text.
  share_l<k>     share of generated tokens that left at depth k

Self-speculative: greedy, draft exit and number of drafts --draft-exit/--num-draft (default: the pair
with the best predicted speedup from teacher-forced acceptance rates); each prompt is decoded
self-speculatively and with the full model, alternately; identical output is checked token by token.
Batched: --batch prompts decoded together (ContinuousBatcher via nemo_ee.inference.generate) with the
early-exit rule at the speedup_at_98 threshold vs the same batch at full depth; throughput = tokens/s.

Outputs (--out, default bench_decode_out/): sweep.csv and sweep.png (speedup, ideal speedup and
agreement against the threshold). The last line printed is exactly
  RESULT efficiency=<e> speedup_at_98=<s> selfspec_speedup=<p> selfspec_identical=<true|false> batched_speedup=<b>
speedup_at_98 = speedup at the loosest threshold whose agreement is >= 0.98 (--target), and
efficiency = the efficiency at that same threshold. Torch runs with --threads intra-op threads (default 1).
Times are this process's CPU time by default (--clock cpu): on a machine shared with other jobs, wall
time mostly measures the neighbours; with one thread on an idle machine the two agree. The CSV also
has speedup_wall, and the self-speculative and batched lines print the wall-clock ratio.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The benchmark model (default) and the --quick one: conf/ee_gpt_tiny.yaml with these overrides.
DEFAULT_MODEL = {
    "trainer.max_steps": 600,
    "model.micro_batch_size": 8,
    "model.global_batch_size": 8,
    "model.tokenizer.vocab_size": 512,
    "model.arch.num_layers": 16,
    "model.arch.hidden_size": 256,
    "model.arch.num_attention_heads": 4,
    "model.arch.ffn_hidden_size": 1024,
    "model.arch.seq_length": 128,
    "model.arch.exit_layer_nums": [4, 8],
    "model.arch.exit_loss_weights": [0.5, 0.5],
    "model.optim.lr": 1.5e-3,
    "model.optim.min_lr": 1.0e-4,
    "model.optim.warmup_steps": 30,
}
QUICK_MODEL = {
    "trainer.max_steps": 30,
    "model.micro_batch_size": 8,
    "model.global_batch_size": 8,
    "model.tokenizer.vocab_size": 512,
    "model.data.max_files": 60,
    "model.arch.num_layers": 4,
    "model.arch.hidden_size": 64,
    "model.arch.num_attention_heads": 4,
    "model.arch.ffn_hidden_size": 256,
    "model.arch.seq_length": 64,
    "model.arch.exit_layer_nums": [1, 2],
    "model.arch.exit_loss_weights": [0.5, 0.5],
    "model.optim.warmup_steps": 5,
}
CACHE_VERSION = "bench_decode-v1"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring for what is measured)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nemo", default=None, help="early-exit .nemo to measure (default: train/cache the benchmark model)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model (unless --nemo), 5 thresholds, 3 prompts, 12 new tokens, batch 4")
    p.add_argument("--out", default="bench_decode_out", help="directory for sweep.csv and sweep.png")
    p.add_argument("--cache-dir", default=None, help="model cache (default: $NEMO_EE_CACHE or ~/.cache/nemo_ee)")
    p.add_argument("--step", type=float, default=None, help="threshold step, 1.0 down to 0.0 (default 0.05; quick 0.25)")
    p.add_argument("--prompts", type=int, default=None, help="validation prompts (default 6; quick 3)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per prompt (default 96; quick 12)")
    p.add_argument("--batch", type=int, default=None, help="batch size of the batched comparison (default 8; quick 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed EE/full pairs before the measurements")
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the prompts per setting (default 1)")
    p.add_argument("--val-windows", type=int, default=None, help="validation windows for perplexity (default 64; quick 4)")
    p.add_argument("--target", type=float, default=0.98, help="agreement target of speedup_at_98")
    p.add_argument("--draft-exit", type=int, default=None, help="self-speculative draft exit layer (default: best predicted)")
    p.add_argument("--num-draft", type=int, default=None, help="self-speculative drafts per verification (default: best predicted)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for all timings (default 1)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="clock of tokens/s and speedups: this process's CPU time (default; robust on a shared "
                        "machine, equal to wall time on an idle one with 1 thread) or wall time")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile of engine.step")
    args = p.parse_args(argv)
    quick = {"step": 0.25, "prompts": 3, "prompt_len": 16, "new_tokens": 12, "batch": 4, "val_windows": 4}
    full = {"step": 0.05, "prompts": 6, "prompt_len": 32, "new_tokens": 96, "batch": 8, "val_windows": 64}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0.0 < args.step <= 1.0:
        p.error(f"--step {args.step} must be in (0, 1]")
    for key in ("prompts", "prompt_len", "new_tokens", "batch", "threads", "val_windows", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} {getattr(args, key)} must be >= 1")
    return args


def cache_root(cache_dir: str | None) -> Path:
    """Where trained benchmark models live: --cache-dir, $NEMO_EE_CACHE or ~/.cache/nemo_ee."""
    return Path(os.path.expanduser(cache_dir or os.environ.get("NEMO_EE_CACHE", "~/.cache/nemo_ee")))


def model_recipe(overrides: dict, root: Path):
    """conf/ee_gpt_tiny.yaml with ``overrides`` (dotted keys), logging and checkpoints under ``root``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf" / "ee_gpt_tiny.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    steps = int(cfg.trainer.max_steps)
    cfg.trainer.val_check_interval = steps
    cfg.trainer.limit_val_batches = 4
    cfg.exp_manager.exp_dir = str(root / "exp")
    cfg.exp_manager.checkpoint_callback_params.every_n_train_steps = max(1, min(100, steps))
    return cfg


def trained_model(overrides: dict, cache_dir: str | None) -> Path:
    """The cached .nemo for ``overrides``, trained first (nemo_ee.train.pretrain) when it is not there yet."""
    key = hashlib.sha256(json.dumps([CACHE_VERSION, overrides], sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root(cache_dir) / "bench_decode" / key
    path = root / "model.nemo"
    if path.is_file():
        print(f"benchmark model: cached {path}", flush=True)
        return path
    print(f"benchmark model: training conf/ee_gpt_tiny.yaml with {json.dumps(overrides)}\n  -> {path}", flush=True)
    from nemo_ee.train import pretrain

    started = time.perf_counter()
    model = pretrain(model_recipe(overrides, root))
    tmp = root / "model.nemo.tmp"
    model.save_to(str(tmp))
    os.replace(tmp, path)
    print(f"benchmark model: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def write_csv(rows: list, path: Path) -> None:
    """The sweep table; leading '#' lines define the columns (pandas: read_csv(path, comment='#'))."""
    import csv

    columns = list(rows[0])
    with open(path, "w", newline="") as f:
        for line in CSV_NOTES:
            f.write(f"# {line}\n")
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


CSV_NOTES = (
    "early-exit (EE) greedy decoding, policy max_prob, vs full-model greedy decoding, same prompts, paired timings",
    "speedup = median over prompts of full_seconds/ee_seconds (--clock: process CPU time by default); "
    "ee_tok_s, full_tok_s = new tokens / median seconds; speedup_wall = the same ratio in wall-clock time",
    "mean_depth = mean backbone layers per generated token; ideal_speedup = L/mean_depth; efficiency = speedup/ideal",
    "agreement = share of EE tokens equal to the full model's greedy token given the same (EE) prefix",
    "agreement_prefix = share of EE tokens before the EE output first differs from the full greedy output",
    "val_ppl = teacher-forced validation perplexity, each position's distribution from the exit the rule picks",
    "share_l<k> = share of generated tokens that left after k layers",
)


def plot(rows: list, op, num_layers: int, target: float, title: str, path: Path) -> None:
    """Speedup (measured and ideal) and agreement against the threshold, the target line and operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["threshold"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(t, [r["speedup"] for r in rows], "o-", label="measured speedup (tokens/s vs full model)")
    if rows[0].get("speedup_wall") is not None:
        top.plot(t, [r["speedup_wall"] for r in rows], ".:", color="tab:blue", alpha=0.45,
                 label="the same in wall-clock time (shared machine: noisy)")
    top.plot(t, [r["ideal_speedup"] for r in rows], "s--", label=f"ideal speedup = {num_layers} / mean exit depth")
    top.axhline(1.0, color="grey", lw=0.8)
    top.set_ylabel("speedup over full decoding (x)")
    top.set_title(title, fontsize=10)
    bottom.plot(t, [r["agreement"] for r in rows], "o-", color="tab:green",
                label="greedy token agreement with the full model")
    bottom.plot(t, [r["agreement_prefix"] for r in rows], ".:", color="tab:olive",
                label="share before the first divergence")
    bottom.axhline(target, color="tab:red", ls="--", lw=1, label=f"agreement {target}")
    bottom.set_ylabel("agreement")
    bottom.set_xlabel("max-prob exit threshold (a token leaves at an exit when its top probability >= threshold)")
    bottom.set_ylim(0.0, 1.02)
    for ax in (top, bottom):
        if op is not None:
            ax.axvline(op["threshold"], color="tab:red", ls=":", lw=1,
                       label=f"loosest threshold with agreement >= {target}: {op['threshold']:.2f}" if ax is top else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    bottom.invert_xaxis()  # EE-LLM's Figure 9 reads from strict (1.0) to loose (0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile_step(model, prompt, params, top: int = 12) -> None:
    """cProfile one early-exit generation; print the functions with the most own time."""
    import cProfile
    import io
    import pstats

    from nemo_ee.inference.generate import generate

    prof = cProfile.Profile()
    prof.enable()
    generate(model, [prompt], params)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    own = {key: value[2] for key, value in stats.stats.items()}  # (file, line, name) -> own seconds
    kernels = sum(t for (file, _, name), t in own.items() if file == "~" and "torch" in name)
    print(f"cProfile: {kernels / sum(own.values()):.0%} of the profiled time is inside torch operators, the rest "
          "is Python (module calls, megatron plumbing, engine bookkeeping; inflated by the profiler)")
    stats.sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print("cProfile of one early-exit generation (own time, top functions):")
    for ln in lines[start:start + top + 1]:
        print("  " + ln.replace(str(REPO) + "/", "").replace(sys.prefix + "/", "")[:150])


def run_benchmark(path: Path, args: argparse.Namespace) -> None:
    """Everything after the model exists: costs, sweep, CSV/PNG, self-speculative, batched, RESULT."""
    import torch

    from nemo_ee.inference import bench
    from nemo_ee.inference.generate import GenerationParams, generate
    from nemo_ee.inference.loading import load_nemo_for_inference

    nemo = load_nemo_for_inference(path)
    model, ee = nemo.model, nemo.ee_config
    L = ee.num_layers
    if not ee.exit_layer_nums:
        raise SystemExit(f"{path} has no early exits")
    if args.prompt_len + args.new_tokens > ee.max_positions:
        raise SystemExit(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds the model's "
                         f"context of {ee.max_positions} positions")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"model {path}: {L} layers, hidden {ee.hidden_size}, vocab {ee.vocab_size}, exits after layers "
          f"{list(ee.exit_layer_nums)}; torch threads {torch.get_num_threads()}; {args.prompts} prompts of "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; times in {args.clock} seconds", flush=True)

    costs = bench.step_costs(model, twin=bench.narrow_twin(model), clock=args.clock)
    overhead = costs["twin_per_layer"]
    full_s = costs["depth_seconds"][L]
    print("decode step (batch 1): " + ", ".join(f"depth {d}: {s * 1e3:.2f} ms" for d, s in sorted(costs["depth_seconds"].items())))
    print(f"  per layer {costs['per_layer'] * 1e3:.3f} ms, fixed per step {costs['fixed'] * 1e3:.3f} ms -> layers are "
          f"{L * costs['per_layer'] / full_s:.0%} of a full-depth step; of a layer, ~{overhead * 1e3:.3f} ms "
          f"({min(1.0, overhead / costs['per_layer']):.0%}) is Python/dispatch overhead (same layer at hidden 64)",
          flush=True)

    windows = bench.validation_windows(nemo, max(args.prompts, args.batch), args.prompt_len)
    prompts = windows[:args.prompts]
    tf = bench.teacher_forced(model, bench.validation_windows(nemo, args.val_windows, ee.seq_length + 1))
    full = GenerationParams(max_tokens=args.new_tokens)
    for _ in range(args.warmup):  # untimed: allocator, caches, lazy init
        generate(model, prompts[:1], GenerationParams(max_tokens=args.new_tokens, threshold=0.5))
        generate(model, prompts[:1], full)
    full_tokens = [generate(model, [p], full)[0].token_ids for p in prompts]
    print(f"full-model validation perplexity {math.exp(float(tf.final_nll.mean())):.2f}; teacher-forced draft "
          "acceptance " + ", ".join(f"exit l{ee.exit_layer_nums[i]}: {tf.acceptance(i):.3f}"
                                    for i in bench.exit_order(model)), flush=True)

    rows = []
    header = f"{'thr':>5} {'EE tok/s':>9} {'full tok/s':>10} {'speedup':>8} {'depth':>6} {'ideal':>6} {'eff':>5} {'agree':>6} {'ppl':>8}"
    print(header, flush=True)
    for t in bench.thresholds(args.step):
        row, _ = bench.sweep_row(model, prompts, full_tokens, t, args, tf)
        rows.append(row)
        print(f"{t:5.2f} {row['ee_tok_s']:9.1f} {row['full_tok_s']:10.1f} {row['speedup']:8.3f} {row['mean_depth']:6.2f} "
              f"{row['ideal_speedup']:6.2f} {row['efficiency']:5.2f} {row['agreement']:6.3f} {row['val_ppl']:8.2f}",
              flush=True)
    op = bench.operating_point(rows, args.target)
    write_csv(rows, out_dir / "sweep.csv")
    title = (f"{L}-layer early-exit GPT (hidden {ee.hidden_size}, exits after layers {list(ee.exit_layer_nums)}), "
             f"batch 1, greedy, {torch.get_num_threads()} thread(s), {args.clock} time")
    plot(rows, op, L, args.target, title, out_dir / "sweep.png")
    print(f"wrote {out_dir / 'sweep.csv'} and {out_dir / 'sweep.png'}")
    if op is None:
        print(f"no threshold reaches agreement {args.target}; batched run at the strictest threshold")
    threshold = op["threshold"] if op else rows[0]["threshold"]

    if args.draft_exit is None or args.num_draft is None:
        draft, k, predicted = bench.choose_draft(model, tf, costs)
        draft, k = args.draft_exit or draft, args.num_draft or k
        print(f"self-speculative: draft exit l{draft}, {k} drafts (predicted speedup {predicted:.2f})", flush=True)
    else:
        draft, k = args.draft_exit, args.num_draft
    spec = bench.selfspec(model, prompts, full_tokens, args, draft, k)
    print(f"self-speculative: {spec['spec_tok_s']:.1f} vs {spec['full_tok_s']:.1f} tok/s -> {spec['speedup']:.3f}x "
          f"(wall {spec['speedup_wall']:.3f}x), "
          f"{spec['draft_share']:.0%} of tokens from accepted drafts, identical output: {spec['identical']}", flush=True)
    batch = bench.batched(model, windows[:args.batch], args, threshold)
    print(f"batched (batch {args.batch}, threshold {threshold:.2f}): {batch['ee_tok_s']:.1f} vs {batch['full_tok_s']:.1f} "
          f"tok/s -> {batch['speedup']:.3f}x (wall {batch['speedup_wall']:.3f}x; mean exit depth {batch['mean_depth']:.2f})",
          flush=True)
    if not args.no_profile:
        profile_step(model, prompts[0], GenerationParams(max_tokens=args.new_tokens, threshold=threshold))
    if op is not None:
        print(f"operating point: threshold {op['threshold']:.2f}, agreement {op['agreement']:.3f}, speedup "
              f"{op['speedup']:.3f} of ideal {op['ideal_speedup']:.3f}, val_ppl {op['val_ppl']:.2f}")
    print(bench.result_line(op, spec, batch), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    path = Path(args.nemo) if args.nemo else trained_model(QUICK_MODEL if args.quick else DEFAULT_MODEL, args.cache_dir)
    run_benchmark(path, args)


if __name__ == "__main__":
    main()
