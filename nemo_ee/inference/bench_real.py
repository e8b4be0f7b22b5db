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
  selfspec_*            lossless self-speculative decoding drafting at a tuned exit vs our full decode and vs
                        HF ``generate`` (tokens/s ratio)
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
from nemo_ee.inference.bench import agreement, paired, predicted_selfspec
from nemo_ee.inference.generate import GenerationParams, generate
from nemo_ee.inference.speculative import generate_self_speculative

RESULT_KEYS = ("full_vs_hf_b1", "full_vs_hf_b8", "ee_speedup", "ee_agreement", "ee_mean_depth", "selfspec_speedup",
               "selfspec_vs_hf_generate", "hf_ee_speedup", "identical", "selfspec_identical")


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
        return [row[width:].tolist() for row in out]


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


def run(nemo: Any, hf_dir: str | Path, num_prompts: int = 8, new_tokens: int = 64, batch: int = 8,
        repeats: int = 1, clock: str = "cpu", draft_exit: Optional[int] = None, num_draft: Optional[int] = None,
        out_dir: Optional[str | Path] = None, log: Any = print) -> dict:
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
    prompts = chat_prompt_ids(tok, max(num_prompts, batch), BENCH_OFFSET)
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

    # ---- early exit at the calibrated thresholds vs our full decode
    ee_params = GenerationParams(max_tokens=new_tokens, **defaults)
    res = paired(lambda i: generate(model, [bench[i]], ee_params)[0], lambda i: generate(model, [bench[i]], full)[0],
                 len(bench), repeats, clock)
    gens = res["out_a"]
    ee_agree, _ = agreement(model, gens, ours_full)
    depths = [d for g in gens for d in g.exit_layers]
    ee_depth = sum(depths) / len(depths)
    log(f"early exit at the calibrated thresholds {defaults.get('exit_thresholds') or defaults.get('threshold')}: "
        f"speedup {res['ratio']:.3f} (wall {res['ratio_wall']:.3f}), agreement {ee_agree:.4f}, mean depth "
        f"{ee_depth:.2f} of {ee.num_layers}")

    # ---- self-speculative (ours, tuned exit) vs full and vs HF generate; HF assistant_early_exit at that layer
    acceptance = teacher_forced_acceptance(model, bench, ours_full)
    layer, k, predicted = choose_draft(model, acceptance)
    layer, k = draft_exit or layer, num_draft or k
    log("teacher-forced acceptance per exit: " + ", ".join(f"l{a}={b:.3f}" for a, b in acceptance.items())
        + f"; drafting at layer {layer}, {k} tokens (predicted {predicted:.2f}x)")
    spec = GenerationParams(max_tokens=new_tokens, decode_mode="self_speculative", draft_exit=layer, num_draft=k)
    ss = paired(lambda i: generate_self_speculative(model, bench[i], spec).token_ids,
                lambda i: generate(model, [bench[i]], full)[0].token_ids, len(bench), repeats, clock)
    ss_hf = paired(lambda i: generate_self_speculative(model, bench[i], spec).token_ids,
                   lambda i: hf.generate([bench[i]])[0], len(bench), repeats, clock)
    hf_ee = paired(lambda i: hf.generate([bench[i]], assistant_early_exit=layer)[0],
                   lambda i: hf.generate([bench[i]])[0], len(bench), repeats, clock)
    lossless = ss["out_a"] == ours_full  # self-speculative == our own full decode, token for token
    identical_spec = lossless and ss_hf["out_a"] == ss_hf["out_b"]
    identical_hf_ee = hf_ee["out_a"] == hf_ee["out_b"]
    log(f"self-speculative (layer {layer}, k={k}): {ss['ratio']:.3f}x our full decode, {ss_hf['ratio']:.3f}x HF "
        f"generate; identical to our full decode: {lossless}, to HF generate: {ss_hf['out_a'] == ss_hf['out_b']}")
    log(f"HF assistant_early_exit={layer}: {hf_ee['ratio']:.3f}x HF generate; identical {identical_hf_ee}")

    values = {"full_vs_hf_b1": b1["ratio"], "full_vs_hf_b8": b8["ratio"], "ee_speedup": res["ratio"],
              "ee_agreement": ee_agree, "ee_mean_depth": ee_depth, "selfspec_speedup": ss["ratio"],
              "selfspec_vs_hf_generate": ss_hf["ratio"], "hf_ee_speedup": hf_ee["ratio"],
              "identical": identical_b1 and identical_spec and identical_hf_ee, "selfspec_identical": lossless}
    extra = {"identical_b8_rows": f"{same_rows}/{batch}", "identical_b1_prompts": f"{len(bench) - len(split)}/{len(bench)}",
             "divergences_b1": split, "draft_exit": layer, "num_draft": k,
             "acceptance": acceptance, "tok_s_ours_b1": new_tokens / b1["a"], "tok_s_hf_b1": new_tokens / b1["b"],
             "tok_s_ours_b8": batch * new_tokens / b8["a"], "tok_s_hf_b8": batch * new_tokens / b8["b"],
             "new_tokens": new_tokens, "prompts": len(bench), "batch": batch, "clock": clock,
             "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_real_model.json").write_text(json.dumps({**values, **extra}, indent=2, default=str) + "\n")
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
