"""The real-model stages: a pretrained LLM (SmolLM2-135M-Instruct by default) imported, given exits, EE-Tuned on
its own answers, calibrated on chat prompts and swept (lossy early exit and lossless self-speculation).

``real_import``    GGUF -> HF folder (transformers' loader) -> .nemo; a logit check against transformers
``real_add_exits`` exits at depth fractions, copy-initialised from the final norm and output layer
``real_data``      the model's own greedy answers to chat prompts from the stdlib's train split (tuning data)
``real_ee_tune``   EE-Tuning (conf/ee_tuning.yaml keys; by default KL to the final layer on real_data)
``real_calibrate`` per-exit thresholds reaching the target greedy agreement on validation-split chat prompts
``real_sweep``     one threshold at every exit (speedup, agreement, depth) and self-speculative drafting
                   (speedup per draft length, identical output); plots; chat samples with exits marked
"""
from __future__ import annotations

from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf

from nemo_ee.atomic import save_nemo
from nemo_ee.pipeline.base import (
    COMMON_KEYS, StageContext, StageResult, nemo_arch, plain_dict, positive_ints, write_json,
)
from nemo_ee.pipeline.curves import tee_stdout
from nemo_ee.pipeline.report import Section, markdown_table, text_table
from nemo_ee.pipeline.stage_decode import check_sweep_keys

IMPORT_KEYS = ("gguf", "hf_dir", "num_layers")
ADD_KEYS = ("exit_fractions", "exit_mlp", "init")
DATA_KEYS = ("num_prompts", "max_tokens", "batch_size", "seed")
CALIBRATE_KEYS = ("target", "policy", "num_prompts", "max_tokens", "batch_size", "max_rounds", "exit_vocab_size",
                  "choose_draft")
SWEEP_KEYS = ("thresholds", "prompts", "new_tokens", "repeats", "clock", "target", "num_drafts", "draft_exit",
              "sample_prompts", "sample_tokens")
_TUNE_OWN = ("nemo", "restore_from", "output", "overwrite", "name")


def _settings(cfg: DictConfig, stage: str, keys: tuple) -> dict:
    section = plain_dict(cfg.stages[stage])
    return {k: section.get(k) for k in keys}


# ---------------------------------------------------------------------------------------------- import
def import_settings(cfg: DictConfig) -> dict:
    return _settings(cfg, "real_import", IMPORT_KEYS)


def check_real_import(cfg: DictConfig, given: dict) -> None:
    """The GGUF file is there (the default one fetched by scripts/fetch_model.py), or a given .nemo + HF folder."""
    from pathlib import Path

    from nemo_ee.checkpoint.hf.gguf import locate_gguf

    s = import_settings(cfg)
    layers = s["num_layers"]
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ValueError(f"stages.real_import.num_layers={layers!r} must be null (all) or an integer >= 1")
    if "real_import" in given:
        if not s["hf_dir"] or not (Path(str(s["hf_dir"])) / "config.json").is_file():
            raise ValueError("stages.real_import.nemo is given: set stages.real_import.hf_dir to the HF folder it "
                             "was converted from (the comparisons with transformers need it)")
        return
    if s["gguf"]:
        if not Path(str(s["gguf"])).is_file():
            raise FileNotFoundError(f"stages.real_import.gguf={s['gguf']}: no such file")
    elif not s["hf_dir"]:
        locate_gguf()  # FileNotFoundError naming the fetch command


def run_real_import(ctx: StageContext) -> StageResult:
    """GGUF (or an HF folder) -> .nemo with the model's own tokenizer; logits checked against transformers."""
    from nemo_ee.checkpoint.hf import convert_hf_to_nemo
    from nemo_ee.checkpoint.hf.gguf import cached_hf_dir, locate_gguf
    from nemo_ee.data.chat_prompts import chat_prompt_ids
    from nemo_ee.inference.bench_real import HFSide, check_same_weights
    from nemo_ee.inference.loading import load_nemo_for_inference

    s = ctx.stage_cfg
    source = str(s.get("hf_dir") or s.get("gguf") or locate_gguf())
    hf_dir = str(s.hf_dir) if s.get("hf_dir") else str(cached_hf_dir(source))
    nemo_path = convert_hf_to_nemo(hf_dir, ctx.stage_dir / "model.nemo", num_layers=s.get("num_layers"))
    nemo = load_nemo_for_inference(str(nemo_path))
    ee, tok = nemo.ee_config, nemo.tokenizer
    prompt = chat_prompt_ids(tok, 1)[0]
    parity = check_same_weights(nemo.model, HFSide(hf_dir, 1, ee.num_layers), prompt)
    print(f"{source} -> {nemo_path}: {ee.num_layers} layers, hidden {ee.hidden_size}, vocabulary {ee.vocab_size}, "
          f"eos ids {list(tok.eos_ids)}; max |logit - transformers'| = {parity:.2e}", flush=True)
    facts = [["source", f"`{source}`"], ["layers / hidden / heads / KV heads",
             f"{ee.num_layers} / {ee.hidden_size} / {ee.num_attention_heads} / {ee.num_query_groups or ee.num_attention_heads}"],
             ["vocabulary (model = tokenizer, nothing appended)", f"{ee.vocab_size} = {tok.vocab_size}"],
             ["stop ids (generation_config)",
              ", ".join(f"{i} `{tok.decode([i])}`" for i in tok.eos_ids).replace("|", "\\|")],
             ["chat template", "yes" if tok.chat_template else "no"],
             ["tied embeddings", str(ee.share_embeddings_and_output_weights)],
             ["max abs logit difference vs transformers (one chat prompt, fp32)", f"{parity:.2e}"]]
    body = ("The pretrained model, read by transformers' GGUF loader (dequantised to fp32), written as an HF "
            "folder and converted to a .nemo with its own tokenizer (chat template, special tokens).\n\n"
            + markdown_table(["", ""], facts) + f"\n\nModel: `{nemo_path}`; HF folder: `{hf_dir}`.")
    return StageResult({"nemo": str(nemo_path), "hf_dir": hf_dir, "parity": parity, "num_layers": ee.num_layers},
                       [Section("The real model", body)])


# ---------------------------------------------------------------------------------------------- add exits
def add_settings(cfg: DictConfig) -> dict:
    return _settings(cfg, "real_add_exits", ADD_KEYS)


def check_real_add_exits(cfg: DictConfig, given: dict) -> None:
    if "real_add_exits" in given:
        if not nemo_arch(given["real_add_exits"]).get("exit_layer_nums"):
            raise ValueError(f"stages.real_add_exits.nemo={given['real_add_exits']} has no exits")
        return
    s = add_settings(cfg)
    fractions = s["exit_fractions"]
    if not isinstance(fractions, list) or not fractions or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions):
        raise ValueError(f"stages.real_add_exits.exit_fractions={fractions!r} must be a non-empty list of numbers "
                         "in (0, 1]")
    if not isinstance(s["exit_mlp"], bool):
        raise ValueError(f"stages.real_add_exits.exit_mlp={s['exit_mlp']!r} must be true or false")
    if s["init"] not in ("copy", "random"):
        raise ValueError(f"stages.real_add_exits.init={s['init']!r} is not one of ['copy', 'random']")


def run_real_add_exits(ctx: StageContext) -> StageResult:
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel
    from nemo_ee.tuning.add_exits import add_exits, exit_layers_from_fractions

    s = add_settings(ctx.cfg)
    model = EarlyExitGPTNeMoModel.restore_from(ctx.inputs["real_import"]["nemo"], map_location="cpu")
    layers = exit_layers_from_fractions(list(s["exit_fractions"]), model.ee_config.num_layers)
    new = add_exits(model, layers, exit_mlp=bool(s["exit_mlp"]), init=str(s["init"]))
    nemo = save_nemo(new, ctx.stage_dir / "ee_added.nemo")
    head = "norm + residual MLP + output layer" if s["exit_mlp"] else "norm + output layer"
    print(f"exits at layers {layers} of {model.ee_config.num_layers} ({head}, {s['init']} init) -> {nemo}", flush=True)
    body = (f"Exits after layers {layers} of {model.ee_config.num_layers} (fractions {s['exit_fractions']}); each "
            f"head is {head}, {s['init']}-initialised from the final norm and output layer (the output weight is "
            f"the exit's own copy of the tied embedding). Backbone bit-identical. Model: `{nemo}`.")
    return StageResult({"nemo": str(nemo), "exit_layers": layers}, [Section("Adding exits to the real model", body)])


# ---------------------------------------------------------------------------------------------- tuning data
def data_settings(cfg: DictConfig) -> dict:
    return _settings(cfg, "real_data", DATA_KEYS)


def check_real_data(cfg: DictConfig, given: dict) -> None:
    s = data_settings(cfg)
    positive_ints("real_data", s, ("num_prompts", "max_tokens", "batch_size"))
    if isinstance(s["seed"], bool) or not isinstance(s["seed"], int):
        raise ValueError(f"stages.real_data.seed={s['seed']!r} must be an integer")


def run_real_data(ctx: StageContext) -> StageResult:
    from nemo_ee.inference.loading import load_nemo_for_inference
    from nemo_ee.tuning.self_data import generate_tuning_data

    s = data_settings(ctx.cfg)
    nemo = load_nemo_for_inference(ctx.inputs["real_import"]["nemo"])
    out = ctx.stage_dir / "answers.npy"
    stats = generate_tuning_data(nemo, out, s["num_prompts"], s["max_tokens"], s["batch_size"], s["seed"])
    print(f"tuning data: {stats}", flush=True)
    body = (f"The model's own greedy answers (full depth, at most {s['max_tokens']} tokens, stopping at its eos) "
            f"to {stats['prompts']} chat prompts made from documented functions of the stdlib's train split "
            f"(nemo_ee.data.chat_prompts: write / explain / test / summarise ...): {stats['tokens']} tokens with the "
            f"chat template, {stats['answer_tokens']} of them answer tokens, {stats['stopped_at_eos']} answers ended "
            f"at eos; generated at {stats['answer_tokens_per_s']} answer tokens/s (batch {s['batch_size']}). "
            f"File: `{out}`.")
    return StageResult({"tokens_file": str(out), **stats}, [Section("Tuning data: the model's own answers", body)])


# ---------------------------------------------------------------------------------------------- EE-Tuning
def tune_settings(cfg: DictConfig) -> dict:
    stage = plain_dict(cfg.stages.real_ee_tune)
    return {k: v for k, v in stage.items() if k not in COMMON_KEYS and k not in _TUNE_OWN}


def check_real_ee_tune(cfg: DictConfig, given: dict) -> None:
    """The shared tuning-stage checks, then conf/ee_tuning.yaml's own (loss, data sources, least-squares init)."""
    from nemo_ee.pipeline.stage_tuning import check_tune_stage
    from nemo_ee.tuning.ee_tune import check_tuning_settings

    if not check_tune_stage(cfg, "real_ee_tune", given):
        return
    settings = OmegaConf.create(tune_settings(cfg))
    if settings.get("data") is not None:
        settings.data.token_files = []  # real_data's file does not exist yet; its own checks run then
        settings.data.corpus = True
    check_tuning_settings(settings)


def run_real_ee_tune(ctx: StageContext) -> StageResult:
    from nemo_ee.tuning.ee_tune import tune_nemo

    settings = tune_settings(ctx.cfg)
    out = ctx.stage_dir / "ee_tuned.nemo"
    settings.update(restore_from=ctx.inputs["real_add_exits"]["nemo"], output=str(out), overwrite=True)
    data = dict(settings.get("data") or {})
    if "real_data" in ctx.inputs:
        data["token_files"] = list(data.get("token_files") or []) + [ctx.inputs["real_data"]["tokens_file"]]
    settings["data"] = data
    log = ctx.stage_dir / "tune.log"
    with tee_stdout(log):
        result = tune_nemo(OmegaConf.create(settings))
    layers = ctx.inputs["real_add_exits"].get("exit_layers")
    first, last = result.get("first") or {}, result.get("last") or {}
    rows = [[f"exit at layer {layers[i]}" if layers else f"exit {i}", first.get(i), last.get(i)] for i in sorted(last)]
    what = "the model's own answers (real_data)" if data.get("token_files") else ""
    if data.get("corpus", True):
        what = ("the stdlib corpus" + (" and " + what if what else ""))
    loss = result.get("loss", "ce")
    body = (f"{result['steps']} steps of {settings['micro_batch_size']} windows of {result.get('seq_length')} tokens "
            f"from {what}, loss `{loss}` "
            f"({'KL to the frozen final layer' if loss == 'kl' else 'next-token cross-entropy'}), lr "
            f"{settings['optim']['lr']}, backbone frozen. Training loss (one micro-batch) at the first and last step:"
            f"\n\n" + markdown_table(["exit", "first step", "last step"], rows) + f"\n\nModel: `{out}`.")
    return StageResult({"nemo": str(out), "steps": result["steps"], "log_file": str(log), "loss": loss,
                        "first": {str(k): v for k, v in first.items()}, "last": {str(k): v for k, v in last.items()}},
                       [Section("EE-Tuning the real model", body)])


# ---------------------------------------------------------------------------------------------- calibrate
def calibrate_settings(cfg: DictConfig) -> dict:
    return _settings(cfg, "real_calibrate", CALIBRATE_KEYS)


def check_real_calibrate(cfg: DictConfig, given: dict) -> None:
    from nemo_ee.inference.calibrate import check_calibration_args

    s = calibrate_settings(cfg)
    positive_ints("real_calibrate", s, ("num_prompts", "max_tokens", "batch_size"))
    if s["exit_vocab_size"] is not None:
        positive_ints("real_calibrate", s, ("exit_vocab_size",))
    if not isinstance(s["choose_draft"], bool):
        raise ValueError(f"stages.real_calibrate.choose_draft={s['choose_draft']!r} must be true or false")
    try:
        check_calibration_args(s["target"], s["policy"], s["max_tokens"], s["max_rounds"])
    except ValueError as exc:
        raise ValueError(f"stages.real_calibrate: {exc}") from None


def run_real_calibrate(ctx: StageContext) -> StageResult:
    from nemo_ee.data.chat_prompts import CALIBRATION_OFFSET, chat_prompt_ids
    from nemo_ee.inference.calibrate import calibrate, format_result
    from nemo_ee.inference.cli import write_inference_section
    from nemo_ee.inference.loading import load_nemo_for_inference

    s = calibrate_settings(ctx.cfg)
    src = ctx.inputs["real_ee_tune"]["nemo"]
    nemo = load_nemo_for_inference(src)
    prompts = chat_prompt_ids(nemo.tokenizer, s["num_prompts"], CALIBRATION_OFFSET)
    result = calibrate(nemo.model, prompts, s["target"], s["policy"], s["max_tokens"], s["batch_size"],
                       s["max_rounds"], progress=True, exit_vocab_size=s["exit_vocab_size"],
                       choose_draft=bool(s["choose_draft"]))
    layers = nemo.ee_config.num_layers
    print(format_result(result, layers), flush=True)
    dst = write_inference_section(src, ctx.stage_dir / "real_calibrated.nemo", result.inference_section())
    rows = [[f"exit at layer {k}", "disabled" if v["threshold"] is None else v["threshold"]]
            for k, v in result.per_exit.items()]
    body = (f"Per exit, the loosest `{s['policy']}` threshold whose greedy tokens agree with the full model's on at "
            f"least {s['target']:.0%} of positions, on {s['num_prompts']} chat prompts from the stdlib's validation "
            f"split ({s['max_tokens']} new tokens each), verified by real early-exit decoding: measured agreement "
            f"**{result.measured_agreement:.4f}**, mean exit depth **{result.mean_exit_depth:.2f}** of {layers} "
            f"(target {'met' if result.met else 'NOT met'})"
            + (f"; the exits score an exit vocabulary of the {len(result.exit_vocab)} most frequent tokens of these "
               "prompts and the full model's answers" if result.exit_vocab is not None else "")
            + ".\n\n" + markdown_table(["exit", "threshold"], rows, 4)
            + f"\n\nCalibrated model (its `inference` section holds the thresholds): `{dst}`.")
    return StageResult({"nemo": str(dst), "thresholds": {int(k): float(v) for k, v in result.thresholds.items()},
                        "agreement": result.measured_agreement, "mean_exit_depth": result.mean_exit_depth,
                        "met": result.met, "num_layers": layers},
                       [Section("Calibrated thresholds of the real model", body)])


# ---------------------------------------------------------------------------------------------- sweep
def sweep_settings(cfg: DictConfig) -> dict:
    return _settings(cfg, "real_sweep", SWEEP_KEYS)


def check_real_sweep(cfg: DictConfig, given: dict) -> None:
    s = sweep_settings(cfg)
    positive_ints("real_sweep", s, ("prompts", "new_tokens", "repeats", "sample_tokens"))
    check_sweep_keys("real_sweep", s)
    drafts = s["num_drafts"]
    if not isinstance(drafts, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                               for k in drafts):
        raise ValueError(f"stages.real_sweep.num_drafts={drafts!r} must be a list of integers >= 1")


def run_real_sweep(ctx: StageContext) -> StageResult:
    import csv

    from nemo_ee.inference import bench
    from nemo_ee.data.chat_prompts import SWEEP_OFFSET, chat_prompt_ids
    from nemo_ee.inference.bench_real import choose_draft, teacher_forced_acceptance
    from nemo_ee.inference.generate import GenerationParams, generate
    from nemo_ee.inference.loading import inference_defaults, load_nemo_for_inference
    from nemo_ee.inference.render import mark_exits
    from nemo_ee.plots import selfspec_plot, sweep_comparison

    s = sweep_settings(ctx.cfg)
    path = ctx.inputs["real_calibrate"]["nemo"]
    nemo = load_nemo_for_inference(path)
    model, ee, tok = nemo.model, nemo.ee_config, nemo.tokenizer
    L = ee.num_layers
    prompts = chat_prompt_ids(tok, s["prompts"], SWEEP_OFFSET)
    full = GenerationParams(max_tokens=s["new_tokens"])
    generate(model, prompts[:1], GenerationParams(max_tokens=s["new_tokens"], threshold=0.5))  # warm-up, untimed
    full_tokens = [generate(model, [p], full)[0].token_ids for p in prompts]
    defaults = inference_defaults(nemo.cfg)
    vocab = defaults.get("exit_vocab")  # the calibrated exit vocabulary, if any: the sweep decodes as served
    tf = bench.teacher_forced(model, [p + f for p, f in zip(prompts, full_tokens)], chunk=1, vocab=vocab)
    args = SimpleNamespace(new_tokens=s["new_tokens"], repeats=s["repeats"], clock=s["clock"])
    rows = []
    for t in sorted({float(t) for t in s["thresholds"]}, reverse=True):
        row, _ = bench.sweep_row(model, prompts, full_tokens, t, args, tf, exit_vocab=vocab)
        rows.append(row)
        print(f"  threshold {t:.2f}: speedup {row['speedup']:.3f} (ideal {row['ideal_speedup']:.2f}), agreement "
              f"{row['agreement']:.3f}, mean depth {row['mean_depth']:.2f}", flush=True)
    acceptance = teacher_forced_acceptance(model, prompts, full_tokens)
    draft = s["draft_exit"] or choose_draft(model, acceptance)[0]
    spec_rows = []
    for k in s["num_drafts"]:
        r = bench.selfspec(model, prompts, full_tokens, args, draft, k, exit_vocab=vocab)
        spec_rows.append({"num_draft": k, **r})
        print(f"  self-speculative, layer {draft}, k={k}: speedup {r['speedup']:.3f}, identical {r['identical']}",
              flush=True)
    op = bench.operating_point(rows, float(s["target"]))
    json_path = ctx.stage_dir / "sweep.json"
    write_json(json_path, {"nemo": path, "rows": rows, "selfspec": spec_rows, "acceptance": acceptance,
                           "draft_exit": draft, "operating_point": op})
    csv_path = ctx.stage_dir / "sweep.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows])
    note = (f"{s['prompts']} chat prompts (stdlib validation split), {s['new_tokens']} greedy tokens each, batch 1, "
            f"each decoded both ways alternately ({s['clock']} time)")
    sweep_png = sweep_comparison(ctx.stage_dir / "speedup_agreement.png", {"EE-tuned SmolLM2": rows},
                                 float(s["target"]), f"Lossy early exit on the real model ({L} layers, exits after "
                                 f"layers {list(ee.exit_layer_nums)})", note)
    spec_png = selfspec_plot(ctx.stage_dir / "selfspec.png", spec_rows,
                             f"Lossless self-speculative decoding, drafts at the exit after layer {draft}", note)
    samples = []
    for text in s["sample_prompts"]:
        ids = tok.apply_chat_template([{"role": "user", "content": text}])
        gen = generate(model, [ids], GenerationParams(max_tokens=s["sample_tokens"], stop_token_ids=tok.eos_ids,
                                                      **defaults))[0]
        samples.append({"prompt": text, "marked": mark_exits(tok, gen.token_ids, gen.exit_layers),
                        "finish_reason": gen.finish_reason, "mean_exit_depth": gen.mean_exit_depth})
    rel = lambda p: p.relative_to(ctx.run_dir).as_posix()  # noqa: E731
    headers = ["threshold", "speedup", "ideal speedup", "agreement", "mean exit depth"]
    table = [[r["threshold"], r["speedup"], r["ideal_speedup"], r["agreement"], r["mean_depth"]] for r in rows]
    print(text_table(headers, table, 3), flush=True)
    spec_table = [[r["num_draft"], r["speedup"], r["draft_share"], "yes" if r["identical"] else "NO"] for r in spec_rows]
    found = (f"threshold {op['threshold']:.2f}: speedup {op['speedup']:.3f}, agreement {op['agreement']:.3f}"
             if op else f"no swept threshold reaches {s['target']}")
    body = (f"Lossy early exit: one `max_prob` threshold at every exit"
            + (f" (the exits score the calibrated exit vocabulary of {len(vocab)} ids, as served)" if vocab else "")
            + ", speedup = full time / early-exit time "
            f"(median over prompts), agreement = share of tokens equal to the full model's greedy token after the "
            f"same prefix. Loosest threshold with agreement >= {s['target']}: {found}.\n\n"
            f"![speedup and agreement against threshold]({rel(sweep_png)})\n\n" + markdown_table(headers, table, 3)
            + f"\n\nLossless self-speculative decoding: the exit after layer {draft} drafts k tokens, one full-depth "
            f"pass verifies them (teacher-forced acceptance per exit: "
            + ", ".join(f"layer {a}: {b:.3f}" for a, b in acceptance.items()) + ").\n\n"
            + markdown_table(["k (drafts)", "speedup", "share of tokens drafted", "identical to full"], spec_table, 3)
            + f"\n\n![self-speculative speedup against draft length]({rel(spec_png)})\n\nNumbers: `{rel(csv_path)}`, "
            f"`{rel(json_path)}`.")
    sample_body = [f"Chat answers with the calibrated thresholds; after every token, `⟨k⟩` is the number of layers it "
                   f"ran (k = {L}: the full model)."]
    for i, sample in enumerate(samples, 1):
        sample_body.append(f"**Sample {i}** — {sample['prompt']!r} (finish: {sample['finish_reason']}, mean exit "
                           f"depth {sample['mean_exit_depth']:.2f}):\n\n```text\n{sample['marked']}\n```")
    return StageResult({"sweep_json": str(json_path), "sweep_csv_file": str(csv_path), "speedup_png": str(sweep_png),
                        "selfspec_png": str(spec_png), "operating_point": op, "draft_exit": draft},
                       [Section("The real model: early-exit and self-speculative decoding", body),
                        Section("The real model: chat answers with exits marked", "\n\n".join(sample_body))])
