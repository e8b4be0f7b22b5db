"""The main job's real-model stages end to end, on the first 4 layers of SmolLM2 (real weights, real tokenizer):
import (logits checked against transformers), exits, the model's own answers as data, EE-Tuning (least-squares
init + KL), calibration on chat prompts, the sweep (lossy and self-speculative), a chat request through a real
tritonserver, and bench_real_model's RESULT line."""
import json

import pytest

from tests.test_pipeline import REAL_STAGES, parse_table, run_script, triton_unusable

TINY_OFF = ["stages.corpus.skip=true", "stages.pretrain_plain.skip=true", "stages.pretrain_ee.skip=true"]
REAL_SHORT = [
    "stages.real_import.skip=false", "stages.real_import.num_layers=4", "stages.real_add_exits.exit_fractions=[0.5]",
    "stages.real_data.num_prompts=4", "stages.real_data.max_tokens=8", "stages.real_data.batch_size=4",
    "stages.real_ee_tune.max_steps=3", "stages.real_ee_tune.seq_length=64", "stages.real_ee_tune.micro_batch_size=2",
    "stages.real_ee_tune.lstsq_init_windows=4", "stages.real_calibrate.num_prompts=2",
    "stages.real_calibrate.max_tokens=6", "stages.real_calibrate.batch_size=2", "stages.real_sweep.prompts=1",
    "stages.real_sweep.new_tokens=6", "stages.real_sweep.thresholds=[1.0,0.0]", "stages.real_sweep.num_drafts=[2]",
    "stages.real_sweep.sample_prompts=[Hi]", "stages.real_sweep.sample_tokens=4", "stages.triton.chat_max_tokens=6",
    *[f"stages.benchmarks.{b}.enabled=false" for b in ("bench_train_overhead", "bench_pipeline_comm",
                                                       "bench_bubble_fill", "bench_tuning", "bench_decode",
                                                       "bench_triton")],
    "stages.benchmarks.bench_real_model.args=[--quick,--nemo,'{real_nemo}',--hf-dir,'{real_hf_dir}',--out,'{out}',"
    "--new-tokens,6,--prompts,1,--batch,2]",
]


@pytest.mark.slow
def test_real_model_stages_end_to_end(tmp_path, smollm2_hf_dir):
    no_triton = triton_unusable()
    proc = run_script(tmp_path, "name=real", *TINY_OFF, *REAL_SHORT, f"stages.real_import.hf_dir={smollm2_hf_dir}",
                      *(["stages.triton.skip=true"] if no_triton else []))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "out" / "real"
    info = {s["stage"]: s["action"] for s in json.loads((root / "pipeline.json").read_text())["stages"]}
    assert all(info[n] == "run" for n in REAL_STAGES) and info["calibrate"] == "skip"
    report = (root / "report.md").read_text()

    _, facts = parse_table(report, "The real model")
    assert facts["vocabulary (model = tokenizer, nothing appended)"] == ["49152 = 49152"]
    assert facts["stop ids (generation_config)"][0].startswith("2 `<")  # <|im_end|>, its pipes escaped
    assert float(facts["max abs logit difference vs transformers (one chat prompt, fp32)"][0]) <= 1e-4
    data = json.loads((root / "real_data" / "stage.json").read_text())["artefacts"]
    assert data["prompts"] == 4 and data["answer_tokens"] <= 4 * 8 and data["tokens"] > data["answer_tokens"]

    tune_log = (root / "real_ee_tune" / "tune.log").read_text()
    assert "least-squares init, exit at layer 2" in tune_log and "(kl to final, T=1)" in tune_log

    # calibrated thresholds round-trip: written into the .nemo's inference section, read back as decoding defaults
    from nemo_ee.inference.loading import inference_defaults
    from nemo_ee.tuning.add_exits import read_nemo_config

    cal = json.loads((root / "real_calibrate" / "stage.json").read_text())["artefacts"]
    section = read_nemo_config(cal["nemo"])
    assert section.inference.calibration.target == 0.98 and section.inference.calibration.n_prompts == 2
    assert {int(k): float(v) for k, v in (inference_defaults(section).get("exit_thresholds") or {}).items()} == {
        int(k): v for k, v in cal["thresholds"].items()}

    sweep = json.loads((root / "real_sweep" / "sweep.json").read_text())
    by_t = {r["threshold"]: r for r in sweep["rows"]}
    assert (by_t[1.0]["mean_depth"], by_t[1.0]["agreement"]) == (4.0, 1.0)  # never exits
    assert by_t[0.0]["mean_depth"] == 2.0  # always leaves at the exit after layer 2
    assert [r["identical"] for r in sweep["selfspec"]] == [True]  # lossless
    for name in ("speedup_agreement.png", "selfspec.png"):
        assert (root / "real_sweep" / name).stat().st_size > 10_000
    assert "![self-speculative speedup against draft length](real_sweep/selfspec.png)" in report

    if not no_triton:
        answers = json.loads((root / "triton" / "answers.json").read_text())["answers"]
        assert [a["prompt"] for a in answers] == ["In one sentence, what does Python's len() function return?"]
        assert all(a["same_as_local"] and 1 <= len(a["output_ids"]) <= 6 for a in answers), answers

    results = json.loads((root / "benchmarks" / "results.json").read_text())
    real = results["bench_real_model"]
    assert real["status"] == "ok", real
    from nemo_ee.inference.bench_real import RESULT_KEYS

    assert set(real["values"]) == set(RESULT_KEYS)
    assert real["values"]["identical"] == "true"  # ours (full, self-speculative) == HF generate, token for token
    assert real["values"]["selfspec_identical"] == "true"  # lossless: self-speculative == our full decode
