"""The real-model benchmark (scripts/bench_real_model.py): nemo_ee vs Hugging Face transformers, side by side.

One early-exit .nemo of an imported model (by default the main job's calibrated SmolLM2) and transformers'
own model on the same weights (the HF folder the .nemo was converted from; a logit check at start refuses
a mismatch). Prompts: chat prompts from the stdlib's validation split, through the model's chat template.
Every comparison alternates the two sides prompt by prompt (:func:`nemo_ee.inference.bench.paired`) and
times this process's CPU time with one torch thread by default (a shared machine's wall time measures
its neighbours), and every side generates exactly ``new_tokens`` greedy tokens: no stop ids on our side,
and HF's generation config without an eos (so its argmax is never masked, as ``min_new_tokens`` would).

Measured:
  full_vs_hf_b1 / _b8   our full-depth tokens/s over HF ``generate``'s, batch 1 and one batch of ``batch``
  ee_*                  early exit at the .nemo's calibrated thresholds vs our full decode (batch 1): speedup,
                        agreement (share of tokens equal to the full model's greedy token given the same
                        prefix), mean exit depth
  roofline_b1           our batch-1 full-depth tokens/s over the memory roofline: the machine's bandwidth (bytes a
                        large tensor copy moves per second, same clock and threads) / the weight bytes a token reads
  ee_b8_speedup         early exit at the calibrated thresholds, one batch of ``batch``, over our batched full decode
  selfspec_*            lossless self-speculative decoding drafting at a tuned exit vs our full decode and vs
                        HF ``generate`` (tokens/s ratio); the draft exit, length and adaptive threshold are chosen by
                        :mod:`nemo_ee.inference.draft_choice` from measured step costs (the better predicted of the
                        best fixed length and the best adaptive setting)
  selfspec_b8_speedup   the same, batched (every row drafts, one forward verifies all rows), over batched full decode
  selfspec_adaptive_vs_fixed  the best adaptive setting's tokens/s over the best fixed length's (batch 1)
  hf_ee_speedup         HF ``generate(assistant_early_exit=E)`` (its own self-speculation at the same layer,
                        with the untrained final head as drafter) over HF ``generate``
  selfspec_identical    our self-speculative output equals our full decode token for token (lossless)
  identical             every greedy output of ours (full, self-speculative) equals HF's token for token; where
                        one does not, the log names the first differing token and HF's own logit gap between
                        the two candidates there (a near tie that float noise of ~1e-4 may break either way)
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from nemo_ee.data.chat_prompts import BENCH_OFFSET, chat_prompt_ids
from nemo_ee.inference import draft_choice
from nemo_ee.inference.bench import agreement, paired, predicted_selfspec
from nemo_ee.inference.generate import GenerationParams, generate
from nemo_ee.plots import line_plot

RESULT_KEYS = ("full_vs_hf_b1", "full_vs_hf_b8", "roofline_b1", "ee_speedup", "ee_agreement", "ee_mean_depth",
               "ee_b8_speedup", "selfspec_speedup", "selfspec_vs_hf_generate", "selfspec_b8_speedup",
               "selfspec_adaptive_vs_fixed", "hf_ee_speedup", "identical", "selfspec_identical")
SWEEP_BATCHES = (1, 2, 4, 8, 16)


class HFSide:
    """transformers' model on the same weights, generating exactly ``new_tokens`` greedy tokens."""

    def __init__(self, hf_dir: str | Path, new_tokens: int, num_layers: Optional[int] = None) -> None:
        """``num_layers``: only the first layers (the reference of a .nemo cut with ``keep_first_layers``)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(hf_dir))
        if num_layers is not None and num_layers != config.num_hidden_layers:
            config.num_hidden_layers = int(num_layers)
            if hasattr(config, "layer_types") and config.layer_types:
                config.layer_types = config.layer_types[:num_layers]
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), config=config, dtype=torch.float32).eval()
        self.config = copy.deepcopy(self.model.generation_config)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self.config.update(eos_token_id=None, pad_token_id=pad, do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=None, temperature=None, top_p=None, top_k=None)
        # generate() fills a config's unset (None) fields from the model's own generation config, eos included:
        # unset it there too, or HF stops at eos and times fewer tokens than ours
        self.model.generation_config.eos_token_id = None
        self.pad = int(pad)

    @torch.no_grad()
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model(torch.tensor([list(ids)])).logits[0]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list[list[int]]:
        """Greedy continuations; a batch is left-padded with an attention mask, as HF batching is done."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p))
            mask[i, width - len(p):] = 1
        out = self.model.generate(ids, attention_mask=mask, generation_config=self.config, **kwargs)
        rows = [row[width:].tolist() for row in out]
        if any(len(r) != self.config.max_new_tokens for r in rows):
            raise RuntimeError(f"HF generate returned {[len(r) for r in rows]} tokens, not "
                               f"{self.config.max_new_tokens} per row: the timing comparison would be void")
        return rows


def divergences(hf: "HFSide", prompts: Sequence[Sequence[int]], ours: Sequence[Sequence[int]],
                theirs: Sequence[Sequence[int]]) -> list[dict]:
    """Where two greedy outputs of the same prompts first differ, and HF's own logit gap there between the two
    tokens: a gap within float noise (the two implementations' logits differ by ~1e-4) is a near tie that
    either side may break, not a bug."""
    out = []
    for i, (prompt, a, b) in enumerate(zip(prompts, ours, theirs)):
        d = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is None:
            continue
        logits = hf.logits(list(prompt) + list(a[:d]))[-1]
        out.append({"prompt": i, "position": d, "ours": int(a[d]), "hf": int(b[d]),
                    "hf_logit_gap": float(logits[b[d]] - logits[a[d]])})
    return out


def check_same_weights(model: torch.nn.Module, hf: HFSide, prompt: Sequence[int], tol: float = 1e-3) -> float:
    """Max |logit difference| of the two models on ``prompt``; a ValueError when they are not the same model."""
    with torch.no_grad():
        ours = model(torch.tensor([list(prompt)]), torch.arange(len(prompt)).unsqueeze(0), None).output[0]
    diff = float((ours - hf.logits(prompt)).abs().max())
    if not diff <= tol:
        raise ValueError(f"the .nemo and the HF model give logits {diff:.3g} apart on the same prompt: they are not "
                         "the same weights (pass --hf-dir of the checkpoint the .nemo was converted from)")
    return diff


def teacher_forced_acceptance(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                              outputs: Sequence[Sequence[int]]) -> dict[int, float]:
    """{exit layer: share of generated positions where the exit's argmax equals the final layer's}."""
    same: dict[int, int] = {}
    total = 0
    with torch.no_grad():
        for prompt, out in zip(prompts, outputs):
            seq = torch.tensor([list(prompt) + list(out)[:-1]])
            result = model(seq, torch.arange(seq.shape[1]).unsqueeze(0), None)
            final = result.output[0, len(prompt) - 1:].argmax(-1)
            for index, logits in result.exits.items():
                layer = model.ee_config.exit_layer_nums[index]
                same[layer] = same.get(layer, 0) + int((logits[0, len(prompt) - 1:].argmax(-1) == final).sum())
            total += len(final)
    return {layer: n / max(1, total) for layer, n in sorted(same.items())}


def choose_draft(model: torch.nn.Module, acceptance: dict[int, float], ks: Sequence[int] = range(1, 9)) -> tuple:
    """(draft exit layer, num_draft, predicted speedup) by :func:`predicted_selfspec` with a draft costing its
    depth (+1 for the head) over the full depth (+1)."""
    L = model.ee_config.num_layers
    best = None
    for layer, alpha in acceptance.items():
        point = model.ee_config.exit_point(layer)
        for k in ks:
            p = predicted_selfspec(alpha, k, (point + 1) / (L + 1), 1.0)
            if best is None or p > best[2]:
                best = (layer, k, p)
    return best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one full-depth token reads: every decoder layer and the final norm, and the whole output
    matrix (the embedding when tied); the embedding lookup reads one row, exits are not run."""
    out = model.shared_embedding_or_output_weight() if model.ee_config.share_embeddings_and_output_weights \
        else model.output_layer.weight
    params = list(model.decoder.parameters()) + [out]
    return sum(p.numel() * p.element_size() for p in params)


def copy_bandwidth(clock: str = "cpu", megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second a large tensor copy moves (read + write), on ``clock``, with torch's current threads."""
    src = torch.randn(megabytes * 2 ** 18)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    timer = time.process_time if clock == "cpu" else time.perf_counter
    best = math.inf
    for _ in range(repeats):
        t0 = timer()
        dst.copy_(src)
        best = min(best, timer() - t0)
    return 2 * src.numel() * src.element_size() / best


def batch_sweep(model: Any, hf: "HFSide", prompts: Sequence[Sequence[int]], batches: Sequence[int],
                params: dict[str, GenerationParams], clock: str = "cpu") -> dict[str, dict[int, float]]:
    """Tokens/s of each of our settings (name -> params) and of HF ``generate`` at each batch size, one timed
    run each, alternating the order per batch size; every row generates exactly the same number of tokens."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    sides = [(name, lambda group, p=p: generate(model, group, p)) for name, p in params.items()]
    sides.append(("HF generate", lambda group: hf.generate(group)))
    out: dict[str, dict[int, float]] = {name: {} for name, _ in sides}
    new = next(iter(params.values())).max_tokens
    for j, b in enumerate(batches):
        group = [list(p) for p in prompts[:b]]
        for name, fn in (sides if j % 2 == 0 else sides[::-1]):
            t0 = timer()
            fn(group)
            out[name][b] = b * new / (timer() - t0)
    return out


def batch_plot(path: Path, sweep: dict[str, dict[int, float]], hf_ee_b1: Optional[float], note: str) -> Path:
    """Tokens/s against batch size, one line per setting; HF assistant_early_exit as a batch-1 point."""
    series = {name: sorted(points.items()) for name, points in sweep.items()}
    marks = {"HF assistant_early_exit (batch 1 only)": (1, hf_ee_b1)} if hf_ee_b1 else {}
    return line_plot(path, series, "Decode tokens/s by batch size (same prompts, same weights)", "batch size",
                     "tokens / s", note=note, marks=marks, log2x=True)


def run(nemo: Any, hf_dir: str | Path, num_prompts: int = 8, new_tokens: int = 64, batch: int = 8,
        repeats: int = 1, clock: str = "cpu", draft_exit: Optional[int] = None, num_draft: Optional[int] = None,
        out_dir: Optional[str | Path] = None, log: Any = print, batches: Sequence[int] = SWEEP_BATCHES) -> dict:
    """Every measurement of the module docstring; returns the RESULT values and the details."""
    from nemo_ee.inference.loading import inference_defaults

    model, tok = nemo.model, nemo.tokenizer
    ee = model.ee_config
    if not ee.num_exits:
        raise ValueError("the .nemo has no exits: give an EE-tuned (and calibrated) model")
    defaults = inference_defaults(nemo.cfg)
    if "calibration" not in (nemo.cfg.get("inference") or {}):
        raise ValueError("the .nemo has no calibrated thresholds: run scripts/calibrate.py on it first")
    if not defaults.get("exit_thresholds") and defaults.get("threshold") is None:
        log("note: calibration disabled every exit (none reaches the target): early exit = full-depth decoding")
    prompts = chat_prompt_ids(tok, max(num_prompts, batch, *batches), BENCH_OFFSET)
    hf = HFSide(hf_dir, new_tokens, ee.num_layers)
    parity = check_same_weights(model, hf, prompts[0])
    log(f"same weights: max |logit diff| {parity:.2e}; {len(prompts)} prompts of {min(map(len, prompts))}.."
        f"{max(map(len, prompts))} tokens, {new_tokens} new tokens each, clock={clock}, "
        f"{torch.get_num_threads()} thread(s)")
    bench = prompts[:num_prompts]
    full = GenerationParams(max_tokens=new_tokens)
    details: dict[str, Any] = {"parity": parity}

    # ---- full depth, batch 1 and batch `batch`: ours vs HF generate
    generate(model, [bench[0]], full), hf.generate([bench[0]])  # warm-up
    b1 = paired(lambda i: generate(model, [bench[i]], full)[0].token_ids, lambda i: hf.generate([bench[i]])[0],
                len(bench), repeats, clock)
    ours_full = b1["out_a"]
    identical_b1 = ours_full == b1["out_b"]
    split = divergences(hf, bench, ours_full, b1["out_b"])
    log(f"full depth, batch 1: ours {new_tokens / b1['a']:.1f} tok/s, HF generate {new_tokens / b1['b']:.1f} tok/s, "
        f"ratio {b1['ratio']:.3f} (wall {b1['ratio_wall']:.3f}); identical tokens: {len(bench) - len(split)}/"
        f"{len(bench)} prompts" + "".join(f"; prompt {d['prompt']} differs at token {d['position']} (HF's logit gap "
                                         f"between the two tokens {d['hf_logit_gap']:.1e})" for d in split))
    group = prompts[:batch]
    b8 = paired(lambda _: [g.token_ids for g in generate(model, group, full)], lambda _: hf.generate(group), 1,
                max(repeats, 2), clock)
    same_rows = sum(a == b for a, b in zip(b8["out_a"][0], b8["out_b"][0]))
    log(f"full depth, batch {batch}: ours {batch * new_tokens / b8['a']:.1f} tok/s, HF generate "
        f"{batch * new_tokens / b8['b']:.1f} tok/s, ratio {b8['ratio']:.3f}; rows identical {same_rows}/{batch}")
    details.update(full_b1=b1, full_b8=b8)
    bandwidth, nbytes = copy_bandwidth(clock), weight_bytes(model)
    roofline = bandwidth / nbytes
    log(f"roofline at batch 1: {bandwidth / 1e9:.1f} GB/s copy bandwidth / {nbytes / 1e6:.0f} MB of weights per token "
        f"= {roofline:.1f} tok/s; ours {new_tokens / b1['a']:.1f} tok/s = {new_tokens / b1['a'] / roofline:.3f} of it")

    # ---- early exit at the calibrated thresholds vs our full decode
    ee_params = GenerationParams(max_tokens=new_tokens, **defaults)
    res = paired(lambda i: generate(model, [bench[i]], ee_params)[0], lambda i: generate(model, [bench[i]], full)[0],
                 len(bench), repeats, clock)
    gens = res["out_a"]
    ee_agree, _ = agreement(model, gens, ours_full)
    depths = [d for g in gens for d in g.exit_layers]
    ee_depth = sum(depths) / len(depths)
    log(f"early exit at the calibrated thresholds {defaults.get('exit_thresholds') or defaults.get('threshold')}"
        + (f" over an exit vocabulary of {len(defaults['exit_vocab'])} ids" if defaults.get("exit_vocab") else "") + ": "
        f"speedup {res['ratio']:.3f} (wall {res['ratio_wall']:.3f}), agreement {ee_agree:.4f}, mean depth "
        f"{ee_depth:.2f} of {ee.num_layers}")

    ee8 = paired(lambda _: generate(model, group, ee_params), lambda _: generate(model, group, full), 1,
                 max(repeats, 2), clock)
    alone = {tuple(p): g.token_ids for p, g in zip(bench, gens)}
    ee8_same = [alone[tuple(p)] == g.token_ids for p, g in zip(group, ee8["out_a"][0]) if tuple(p) in alone]
    log(f"early exit, batch {batch}: {ee8['ratio']:.3f}x our batched full decode; rows equal to their batch-1 "
        f"output {sum(ee8_same)}/{len(ee8_same)}")

    # ---- self-speculative (ours, tuned exit) vs full and vs HF generate; HF assistant_early_exit at that layer
    vocab = defaults.get("exit_vocab")  # the calibrated exit vocabulary (drafts read it too), if any
    stats, draft_costs, choice = draft_choice.measure_and_choose(model, bench, ours_full, vocab, steps=24,
                                                                 context=64, clock=clock)
    (f_layer, f_k, f_pred), (a_layer, a_k, a_t, a_pred) = choice["fixed"], choice["adaptive"]
    log("draft steps cost " + ", ".join(f"l{a}={c:.3f}" for a, c in draft_costs.items()) + " of a full step; "
        "teacher-forced acceptance " + ", ".join(f"l{a}={stats.acceptance(a):.3f}" for a in draft_costs)
        + f"; best fixed: layer {f_layer}, k={f_k} (predicted {f_pred:.3f}x); best adaptive: layer {a_layer}, "
        f"up to {a_k}, threshold {a_t} (predicted {a_pred:.3f}x)")
    fixed = GenerationParams(max_tokens=new_tokens, decode_mode="self_speculative", draft_exit=draft_exit or f_layer,
                             num_draft=num_draft or f_k, exit_vocab=vocab)
    adaptive = GenerationParams(max_tokens=new_tokens, decode_mode="self_speculative", draft_exit=draft_exit or a_layer,
                                num_draft=num_draft or a_k, draft_threshold=a_t, exit_vocab=vocab)
    spec = adaptive if draft_choice.best(choice)["draft_threshold"] is not None else fixed
    layer, k = spec.draft_exit, spec.num_draft
    adapt = paired(lambda i: generate(model, [bench[i]], adaptive)[0].token_ids,
                   lambda i: generate(model, [bench[i]], fixed)[0].token_ids, len(bench), repeats, clock)
    log(f"adaptive vs fixed draft length: {adapt['ratio']:.3f}x; both lossless: "
        f"{adapt['out_a'] == ours_full and adapt['out_b'] == ours_full}")
    ss = paired(lambda i: generate(model, [bench[i]], spec)[0].token_ids,
                lambda i: generate(model, [bench[i]], full)[0].token_ids, len(bench), repeats, clock)
    ss_hf = paired(lambda i: generate(model, [bench[i]], spec)[0].token_ids,
                   lambda i: hf.generate([bench[i]])[0], len(bench), repeats, clock)
    ss8 = paired(lambda _: [g.token_ids for g in generate(model, group, spec)],
                 lambda _: [g.token_ids for g in generate(model, group, full)], 1, max(repeats, 2), clock)
    ss8_lossless = ss8["out_a"][0] == ss8["out_b"][0]
    log(f"self-speculative, batch {batch}: {ss8['ratio']:.3f}x our batched full decode; every row equal to its "
        f"full decode: {ss8_lossless}")
    hf_ee = paired(lambda i: hf.generate([bench[i]], assistant_early_exit=layer)[0],
                   lambda i: hf.generate([bench[i]])[0], len(bench), repeats, clock)
    lossless = ss["out_a"] == ours_full and ss8_lossless  # self-speculative == our full decode, token for token
    identical_spec = lossless and ss_hf["out_a"] == ss_hf["out_b"]
    identical_hf_ee = hf_ee["out_a"] == hf_ee["out_b"]
    split_ss = divergences(hf, bench, ss_hf["out_a"], ss_hf["out_b"])
    log(f"self-speculative (layer {layer}, k={k}, threshold {spec.draft_threshold}): {ss['ratio']:.3f}x our full decode, {ss_hf['ratio']:.3f}x HF "
        f"generate; identical to our full decode: {lossless}, to HF generate: {ss_hf['out_a'] == ss_hf['out_b']}"
        + "".join(f"; prompt {d['prompt']} differs from HF at token {d['position']} (HF's logit gap between the two "
                  f"tokens {d['hf_logit_gap']:.1e})" for d in split_ss))
    log(f"HF assistant_early_exit={layer}: {hf_ee['ratio']:.3f}x HF generate; identical {identical_hf_ee}")

    # ---- tokens/s by batch size
    sweep = batch_sweep(model, hf, prompts, [b for b in batches if b <= len(prompts)],
                        {"full depth": full, "early exit (calibrated)": ee_params, "self-speculative": spec}, clock)
    log("tokens/s by batch size: " + "; ".join(f"{name}: " + ", ".join(f"b{b}={v:.1f}" for b, v in points.items())
                                               for name, points in sweep.items()))

    values = {"full_vs_hf_b1": b1["ratio"], "full_vs_hf_b8": b8["ratio"],
              "roofline_b1": new_tokens / b1["a"] / roofline, "ee_speedup": res["ratio"],
              "ee_agreement": ee_agree, "ee_mean_depth": ee_depth, "ee_b8_speedup": ee8["ratio"],
              "selfspec_speedup": ss["ratio"], "selfspec_vs_hf_generate": ss_hf["ratio"],
              "selfspec_b8_speedup": ss8["ratio"], "selfspec_adaptive_vs_fixed": adapt["ratio"],
              "hf_ee_speedup": hf_ee["ratio"],
              "identical": identical_b1 and identical_spec and identical_hf_ee, "selfspec_identical": lossless}
    extra = {"identical_b8_rows": f"{same_rows}/{batch}", "identical_b1_prompts": f"{len(bench) - len(split)}/{len(bench)}",
             "divergences_b1": split, "divergences_selfspec_hf": split_ss, "draft_exit": layer, "num_draft": k, "draft_threshold": spec.draft_threshold,
             "draft_choice": choice, "draft_costs": draft_costs, "ee_b8_rows_equal_b1": f"{sum(ee8_same)}/{len(ee8_same)}",
             "acceptance": {a: stats.acceptance(a) for a in draft_costs}, "bandwidth_bytes_s": bandwidth,
             "weight_bytes": nbytes, "roofline_tok_s": roofline, "batch_sweep": sweep, "tok_s_ours_b1": new_tokens / b1["a"], "tok_s_hf_b1": new_tokens / b1["b"],
             "tok_s_ours_b8": batch * new_tokens / b8["a"], "tok_s_hf_b8": batch * new_tokens / b8["b"],
             "new_tokens": new_tokens, "prompts": len(bench), "batch": batch, "clock": clock,
             "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_real_model.json").write_text(json.dumps({**values, **extra}, indent=2, default=str) + "\n")
        batch_plot(out / "bench_real_batches.png", sweep, new_tokens / hf_ee["a"],
                   f"{new_tokens} new tokens per row, {clock} clock, {torch.get_num_threads()} thread(s); draft layer "
                   f"{layer}, k={k}, threshold {spec.draft_threshold}")
    return {"values": values, "extra": extra}


def result_line(values: dict) -> str:
    """``RESULT full_vs_hf_b1=... identical=true``: every key of :data:`RESULT_KEYS`."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    return "RESULT " + " ".join(f"{k}={fmt(values[k])}" for k in RESULT_KEYS)


def exit_quality(model: torch.nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                 target: float = 0.98) -> dict:
    """Teacher-forced exit quality on the full model's own answers (answer positions only): per exit, the share
    of positions whose argmax equals the final layer's; and, over one max-prob threshold for every exit (1.00
    down to 0.00 in steps of 0.01), the loosest whose decisions (shallowest exit that fires, else the final
    layer) still agree on >= ``target`` of the positions, with the mean depth there and the ideal speedup
    (layers / mean depth; exit-head costs not counted)."""
    from nemo_ee.inference.bench import exit_order, teacher_forced

    L = model.ee_config.num_layers
    order = exit_order(model)
    tf = teacher_forced(model, [list(p) + list(a) for p, a in zip(prompts, answers)], chunk=1)
    mask = torch.tensor([i + 1 >= len(p) for p, a in zip(prompts, answers) for i in range(len(p) + len(a) - 1)])
    out: dict[str, Any] = {f"agree_l{model.ee_config.exit_layer_nums[i]}":
                           float((tf.argmax[i] == tf.final_argmax)[mask].float().mean()) for i in order}
    n = int(mask.sum())
    best = (1.0, 1.0, float(L))
    for step in range(100, -1, -1):
        t = step / 100
        left, depth, ok = torch.ones(n, dtype=torch.bool), torch.full((n,), float(L)), torch.ones(n, dtype=torch.bool)
        for i in order:
            take = left & (tf.conf[i][mask] >= t)
            depth[take] = float(model.exits[str(i)].point)
            ok[take] = (tf.argmax[i] == tf.final_argmax)[mask][take]
            left &= ~take
        if float(ok.float().mean()) >= target:
            best = (t, float(ok.float().mean()), float(depth.mean()))
    out.update(threshold=best[0], agreement=best[1], mean_depth=best[2], ideal_speedup=L / best[2], positions=n)
    return out
