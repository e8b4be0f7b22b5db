"""Stages ``calibrate`` and ``decode_sweep``: per-exit thresholds for both early-exit models, then the
threshold sweep (speedup, agreement, exit depth, share of tokens per exit) and sample generations."""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_ee.pipeline.base import StageContext, StageResult, plain_dict, positive_ints, write_json
from nemo_ee.pipeline.report import Section, markdown_table, text_table

MODELS = (("pretrain_ee", "EE-pretrained"), ("ee_tune", "EE-tuned"))
CALIBRATE_KEYS = ("target", "policy", "num_prompts", "prompt_tokens", "max_tokens", "batch_size", "max_rounds")
SWEEP_KEYS = ("thresholds", "prompts", "prompt_len", "new_tokens", "repeats", "clock", "val_windows", "target",
              "sample_prompts", "sample_tokens")


def _context(cfg: DictConfig) -> int:
    return int(cfg.pretrain.model.arch.seq_length)


# ---------------------------------------------------------------------------------------------- calibrate
def calibrate_settings(cfg: DictConfig) -> dict:
    """What calibration depends on: target, policy, prompt count and length, tokens, rounds."""
    stage = plain_dict(cfg.stages.calibrate)
    return {k: stage.get(k) for k in CALIBRATE_KEYS}


def check_calibrate(cfg: DictConfig, given: dict) -> None:
    """Target in (0, 1], a known policy, positive counts; prompt + generated tokens within the context."""
    from nemo_ee.inference.calibrate import check_calibration_args

    s = calibrate_settings(cfg)
    positive_ints("calibrate", s, ("num_prompts", "prompt_tokens", "max_tokens", "batch_size"))
    try:
        check_calibration_args(s["target"], s["policy"], s["max_tokens"], s["max_rounds"])
    except ValueError as exc:
        raise ValueError(f"stages.calibrate: {exc}") from None
    if s["prompt_tokens"] + s["max_tokens"] > _context(cfg) and not given:
        raise ValueError(f"stages.calibrate: prompt_tokens {s['prompt_tokens']} + max_tokens {s['max_tokens']} "
                         f"exceed the context of {_context(cfg)} tokens (pretrain.model.arch.seq_length)")


def run_calibrate(ctx: StageContext) -> StageResult:
    """Calibrate each early-exit model on validation prompts; write ``<model>_calibrated.nemo`` copies."""
    from nemo_ee.inference.calibrate import calibrate, format_result
    from nemo_ee.inference.cli import validation_prompts, write_inference_section
    from nemo_ee.inference.loading import load_nemo_for_inference

    s = calibrate_settings(ctx.cfg)
    artefacts: dict[str, Any] = {"models": {}}
    rows = []
    for name, label in MODELS:
        if name not in ctx.inputs:
            continue
        src = ctx.inputs[name]["nemo"]
        nemo = load_nemo_for_inference(src)
        prompts = validation_prompts(nemo, s["num_prompts"], s["prompt_tokens"])
        result = calibrate(nemo.model, prompts, s["target"], s["policy"], s["max_tokens"], s["batch_size"],
                           s["max_rounds"], progress=False)
        layers = nemo.ee_config.num_layers
        print(f"{label}:\n{format_result(result, layers)}", flush=True)
        dst = write_inference_section(src, ctx.stage_dir / f"{name}_calibrated.nemo", result.inference_section())
        thresholds = {int(k): float(v) for k, v in result.thresholds.items()}
        artefacts["models"][name] = {
            "label": label, "nemo": str(dst), "source": str(src), "thresholds": thresholds,
            "agreement": result.measured_agreement, "mean_exit_depth": result.mean_exit_depth,
            "met": result.met, "num_layers": layers, "tokens": result.n_tokens}
        artefacts[f"{name}_file"] = str(dst)
        artefacts["nemo"] = str(dst)  # the EE-tuned one when both exist (it comes last): what Triton serves
        cells = ", ".join(f"layer {k}: {'disabled' if v['threshold'] is None else format(v['threshold'], '.4f')}"
                          for k, v in result.per_exit.items())
        rows.append([label, cells, result.measured_agreement, f"{result.mean_exit_depth:.2f} / {layers}",
                     "yes" if result.met else "NO"])
        del nemo
    headers = ["model", "threshold per exit (max_prob)" if s["policy"] == "max_prob" else f"threshold ({s['policy']})",
               "measured agreement", "mean exit depth", f"meets {s['target']}"]
    print(text_table(headers, rows), flush=True)
    body = (f"Per exit, the loosest `{s['policy']}` threshold whose greedy tokens agree with the full model's on "
            f"at least {s['target']:.0%} of positions ({s['num_prompts']} validation prompts of {s['prompt_tokens']} "
            f"tokens, {s['max_tokens']} new tokens each), verified by real early-exit decoding "
            f"(nemo_ee.inference.calibrate). The thresholds are written into a copy of each .nemo (config section "
            f"`inference`): they become the model's decoding defaults (generate.py, Triton).\n\n"
            + markdown_table(headers, rows) + "\n\nCalibrated models: "
            + ", ".join(f"`{m['nemo']}`" for m in artefacts["models"].values()) + ".")
    return StageResult(artefacts, [Section("Calibrated exit thresholds", body)])


# ---------------------------------------------------------------------------------------------- sweep
def sweep_settings(cfg: DictConfig) -> dict:
    """What the sweep depends on: thresholds, prompts and their lengths, repeats, samples."""
    stage = plain_dict(cfg.stages.decode_sweep)
    return {k: stage.get(k) for k in SWEEP_KEYS}


def check_sweep_keys(section: str, s: dict) -> None:
    """The settings every sweep stage shares (``decode_sweep``, ``real_sweep``): thresholds in [0, 1], a known
    clock, a target in (0, 1], non-empty sample prompts."""
    values = s["thresholds"]
    if not isinstance(values, list) or not values or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"stages.{section}.thresholds={values!r} must be a non-empty list of numbers in [0, 1]")
    if s["clock"] not in ("cpu", "wall"):
        raise ValueError(f"stages.{section}.clock={s['clock']!r} is not one of ['cpu', 'wall']")
    if not isinstance(s["target"], (int, float)) or not 0 < s["target"] <= 1:
        raise ValueError(f"stages.{section}.target={s['target']!r} must be in (0, 1]")
    prompts = s["sample_prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"stages.{section}.sample_prompts={prompts!r} must be a list of non-empty strings")


def check_sweep(cfg: DictConfig, given: dict) -> None:
    """Thresholds in [0, 1], positive counts, prompts + new tokens within the context, text sample prompts."""
    s = sweep_settings(cfg)
    positive_ints("decode_sweep", s, ("prompts", "prompt_len", "new_tokens", "repeats", "val_windows", "sample_tokens"))
    check_sweep_keys("decode_sweep", s)
    if s["prompt_len"] + s["new_tokens"] > _context(cfg) and not given:
        raise ValueError(f"stages.decode_sweep: prompt_len {s['prompt_len']} + new_tokens {s['new_tokens']} exceed "
                         f"the context of {_context(cfg)} tokens (pretrain.model.arch.seq_length)")


def _model_path(ctx: StageContext, name: str) -> str:
    calibrated = ctx.inputs.get("calibrate", {}).get("models", {}).get(name)
    return calibrated["nemo"] if calibrated else ctx.inputs[name]["nemo"]


def sweep_model(nemo: Any, s: dict) -> dict:
    """The threshold sweep of one model (nemo_ee.inference.bench), its calibrated decoding and sample texts."""
    from nemo_ee.inference import bench
    from nemo_ee.inference.generate import GenerationParams, context_limit, generate
    from nemo_ee.inference.loading import inference_defaults
    from nemo_ee.inference.render import exit_stats, mark_exits

    model, ee, tok = nemo.model, nemo.ee_config, nemo.tokenizer
    prompts = bench.validation_windows(nemo, s["prompts"], s["prompt_len"])
    tf = bench.teacher_forced(model, bench.validation_windows(nemo, s["val_windows"], ee.seq_length + 1))
    full = GenerationParams(max_tokens=s["new_tokens"])
    generate(model, prompts[:1], GenerationParams(max_tokens=s["new_tokens"], threshold=0.5))  # warm-up, untimed
    full_tokens = [generate(model, [p], full)[0].token_ids for p in prompts]
    args = SimpleNamespace(new_tokens=s["new_tokens"], repeats=s["repeats"], clock=s["clock"])
    rows = []
    for t in sorted({float(t) for t in s["thresholds"]}, reverse=True):
        row, _ = bench.sweep_row(model, prompts, full_tokens, t, args, tf)
        rows.append(row)
        print(f"  threshold {t:.2f}: speedup {row['speedup']:.3f} (ideal {row['ideal_speedup']:.2f}), agreement "
              f"{row['agreement']:.3f}, mean depth {row['mean_depth']:.2f}", flush=True)
    defaults = inference_defaults(nemo.cfg)
    params = GenerationParams(max_tokens=s["new_tokens"], **defaults)
    start = time.perf_counter()
    gens = generate(model, prompts, params)
    stats = exit_stats([g.exit_layers for g in gens], time.perf_counter() - start)
    samples = []
    room = context_limit(model) - int(s["sample_tokens"])
    for text in s["sample_prompts"]:
        ids = tok.encode(text)
        if len(ids) > max(1, room):  # a short context: keep the prompt's end, show what was kept
            ids = ids[-max(1, room):]
            text = tok.decode(ids)
        tokens = min(int(s["sample_tokens"]), context_limit(model) - len(ids))
        sample = GenerationParams(max_tokens=tokens, stop_token_ids=(tok.eos_id,), **defaults)
        gen = generate(model, [ids], sample)[0]
        samples.append({"prompt": text, "marked": mark_exits(tok, gen.token_ids, gen.exit_layers),
                        "text": tok.decode(gen.token_ids), "exit_layers": list(gen.exit_layers),
                        "mean_exit_depth": gen.mean_exit_depth if gen.token_ids else None})
    return {"rows": rows, "operating_point": bench.operating_point(rows, float(s["target"])),
            "num_layers": ee.num_layers, "exit_layers": list(ee.exit_layer_nums), "depths": bench.depth_levels(model),
            "calibrated": {"params": defaults, "tokens": stats["tokens"], "mean_exit_depth": stats["mean_exit_depth"],
                           "exit_share": {str(k): v for k, v in stats["exit_share"].items()}},
            "samples": samples}


def _depth_name(depth: int, num_layers: int) -> str:
    return f"final (layer {depth})" if depth == num_layers else f"exit at layer {depth}"


def run_sweep(ctx: StageContext) -> StageResult:
    """Sweep both early-exit models, plot speedup/agreement and the share of tokens per exit, render samples."""
    import csv

    from nemo_ee.inference.loading import load_nemo_for_inference
    from nemo_ee.plots import grouped_bars, sweep_comparison

    s = sweep_settings(ctx.cfg)
    results: dict[str, dict] = {}
    for name, label in MODELS:
        if name in ctx.inputs:
            path = _model_path(ctx, name)
            print(f"{label} ({path}):", flush=True)
            results[label] = {"nemo": path, **sweep_model(load_nemo_for_inference(path), s)}
    json_path = ctx.stage_dir / "sweep.json"
    write_json(json_path, results)
    csv_path = ctx.stage_dir / "sweep.csv"
    with open(csv_path, "w", newline="") as f:
        columns = ["model"] + sorted({k for r in results.values() for row in r["rows"] for k in row},
                                     key=lambda k: (k.startswith("share"), k != "threshold", k))
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for label, r in results.items():
            for row in r["rows"]:
                writer.writerow({"model": label, **{k: round(v, 5) if isinstance(v, float) else v
                                                    for k, v in row.items()}})
    first = next(iter(results.values()))
    note = (f"{s['prompts']} validation prompts of {s['prompt_len']} tokens, {s['new_tokens']} new tokens each, "
            f"greedy, batch 1; EE and full decoding timed alternately ({s['clock']} time)")
    sweep_png = sweep_comparison(ctx.stage_dir / "speedup_agreement.png", {k: v["rows"] for k, v in results.items()},
                                 float(s["target"]), f"Early-exit decoding vs full decoding ({first['num_layers']}-layer "
                                 f"models, exits after layers {first['exit_layers']})", note)
    depths = sorted({d for r in results.values() for d in r["depths"]})
    share = {label: [r["calibrated"]["exit_share"].get(str(d), 0.0) for d in depths] for label, r in results.items()}
    calibrated = any(r["calibrated"]["params"] for r in results.values())
    share_png = grouped_bars(ctx.stage_dir / "exit_share.png", [_depth_name(d, first["num_layers"]) for d in depths],
                             share, "Share of generated tokens leaving at each exit"
                             + (" (calibrated thresholds)" if calibrated else " (full decoding)"),
                             "share of generated tokens", note.split("; EE")[0] + "; each model's own thresholds")
    rel = lambda p: p.relative_to(ctx.run_dir).as_posix()  # noqa: E731
    rows = []
    for label, r in results.items():
        for row in r["rows"]:
            rows.append([label, row["threshold"], row["speedup"], row["ideal_speedup"], row["agreement"],
                         row["mean_depth"]] + [row.get(f"share_l{d}") for d in depths])
    headers = ["model", "threshold", "speedup", "ideal speedup", "agreement", "mean exit depth"] + [
        f"share {'final' if d == first['num_layers'] else f'l{d}'}" for d in depths]
    print(text_table(headers, rows, 3), flush=True)
    ops = [f"{label}: " + (f"threshold {r['operating_point']['threshold']:.2f}, speedup "
                           f"{r['operating_point']['speedup']:.3f}, agreement {r['operating_point']['agreement']:.3f}"
                           if r["operating_point"] else f"no swept threshold reaches {s['target']}")
           for label, r in results.items()]
    body = (f"Each validation prompt ({s['prompts']} of {s['prompt_len']} tokens) is decoded greedily "
            f"({s['new_tokens']} new tokens) with one `max_prob` threshold at every exit and with the full model, "
            f"alternately; speedup = full time / early-exit time (median over prompts; {s['clock']} time"
            f"{', this process only: robust on a shared machine' if s['clock'] == 'cpu' else ''}), ideal = layers / mean exit "
            f"depth; agreement = share of tokens equal to the full model's greedy token after the same prefix "
            f"(nemo_ee.inference.bench). Loosest threshold with agreement >= {s['target']}: " + "; ".join(ops)
            + f".\n\n![speedup and agreement against threshold]({rel(sweep_png)})\n\n"
            + markdown_table(headers, rows, 3) + f"\n\nNumbers: `{rel(csv_path)}`, `{rel(json_path)}`.")
    cal_rows = [[label, r["calibrated"]["tokens"], r["calibrated"]["mean_exit_depth"]]
                + [r["calibrated"]["exit_share"].get(str(d), 0.0) for d in depths] for label, r in results.items()]
    share_body = ("Decoding the same prompts with each model's calibrated thresholds (its `inference` section): "
                  "the share of generated tokens that left at each exit.\n\n"
                  + markdown_table(["model", "tokens", "mean exit depth"] + [_depth_name(d, first["num_layers"])
                                                                              for d in depths], cal_rows, 3)
                  + f"\n\n![share of tokens per exit]({rel(share_png)})")
    sample_body = ["Greedy decoding with the calibrated thresholds; after every generated token, `⟨k⟩` is the number "
                   f"of layers it ran (k = {first['num_layers']}: the full model; smaller: an early exit)."]
    for label, r in results.items():
        for i, sample in enumerate(r["samples"], 1):
            depth = sample["mean_exit_depth"]
            sample_body.append(f"**{label}, sample {i}** (mean exit depth "
                               f"{'—' if depth is None else f'{depth:.2f}'}):\n\n```text\n{sample['prompt']}"
                               f"{sample['marked']}\n```")
    return StageResult(
        {"sweep_json": str(json_path), "sweep_csv_file": str(csv_path), "speedup_png": str(sweep_png),
         "share_png": str(share_png),
         "operating_points": {k: v["operating_point"] for k, v in results.items()}},
        [Section("Early-exit decoding: speedup and agreement against threshold", body),
         Section("Share of tokens per exit", share_body), Section("Sample generations", "\n\n".join(sample_body))])
