"""The main-job pipeline: config validation before any work, resume/skip decisions, and a short end-to-end run."""
import json
import math
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "pretrain.trainer.max_steps=6", "pretrain.trainer.val_check_interval=6", "pretrain.trainer.limit_val_batches=1",
    "pretrain.trainer.enable_progress_bar=false", "pretrain.trainer.log_every_n_steps=2", "pretrain.model.micro_batch_size=2",
    "pretrain.model.global_batch_size=4", "pretrain.model.data.max_files=20", "pretrain.model.tokenizer.vocab_size=384",
    "pretrain.model.arch.num_layers=4", "pretrain.model.arch.hidden_size=32", "pretrain.model.arch.num_attention_heads=4",
    "pretrain.model.arch.ffn_hidden_size=64", "pretrain.model.arch.seq_length=16", "pretrain.model.arch.exit_layer_nums=[1,2]",
    "stages.ee_tune.max_steps=10", "stages.ee_tune.micro_batch_size=4", "stages.ee_tune.log_every_n_steps=3", "stages.evaluate.val_batches=2",
    "stages.evaluate.batch_size=4", "stages.calibrate.num_prompts=2", "stages.calibrate.prompt_tokens=6",
    "stages.calibrate.max_tokens=8", "stages.calibrate.batch_size=2", "stages.decode_sweep.thresholds=[1.0,0.5,0.0]",
    "stages.decode_sweep.prompts=2", "stages.decode_sweep.prompt_len=6", "stages.decode_sweep.new_tokens=8",
    "stages.decode_sweep.val_windows=2", "stages.decode_sweep.sample_tokens=6", "stages.triton.max_tokens=6", "stages.triton.start_timeout=200",
    "stages.benchmarks.bench_train_overhead.enabled=false", "stages.benchmarks.bench_pipeline_comm.enabled=false",
    "stages.benchmarks.bench_bubble_fill.enabled=false", "stages.benchmarks.bench_triton.enabled=false",
    "stages.benchmarks.bench_tuning.args=[--layers,4,--hidden,32,--heads,4,--vocab,256,--seq,16,--repeats,1,"
    "--warmup,1,--threads,1]",
    "stages.benchmarks.bench_decode.args=[--quick,--nemo,'{nemo}',--out,'{out}',--no-profile,--prompts,2,--prompt-len,4,"
    "--new-tokens,8,--batch,2,--val-windows,2,--step,0.5]",
    "stages.real_import.skip=true",  # the real model's stages have their own test (test_pipeline_real.py)
]
REAL_STAGES = ["real_import", "real_add_exits", "real_data", "real_ee_tune", "real_calibrate", "real_sweep"]
STAGE_NAMES = ["corpus", "pretrain_plain", "pretrain_ee", "add_exits", "ee_tune", "loss_curves", "evaluate", "calibrate",
               "decode_sweep", "triton", "benchmarks"]  # the tiny-model run (SHORT skips the real model's stages)
ALL_STAGES = STAGE_NAMES[:9] + REAL_STAGES + STAGE_NAMES[9:]
AFTER_TUNING = STAGE_NAMES[STAGE_NAMES.index("loss_curves"):]
REAL_SKIPPED = {"real_import": ("skip", "skip=true"),
                "real_add_exits": ("skip", "needs real_import, which is skipped"),
                "real_data": ("skip", "needs real_import, which is skipped"),
                "real_ee_tune": ("skip", "needs real_add_exits, which is skipped"),
                "real_calibrate": ("skip", "needs real_ee_tune, which is skipped"),
                "real_sweep": ("skip", "needs real_calibrate, which is skipped")}


def config(tmp_path, *overrides):
    from nemo_ee.pipeline import load_config

    return load_config([f"out_dir={tmp_path / 'out'}", "name=run", *SHORT, *overrides])


def actions(plan):
    return {p.stage.name: (p.action, p.reason) for p in plan}


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+stages.deploy.skip=true"], r"unknown stage\(s\) \['deploy'\]; the stages are \['corpus', "),
        (["stages.calibrate.target=1.5"], r"stages.calibrate: target 1.5 is outside \(0, 1\]"),
        (["stages.calibrate.policy=vote"], r"stages.calibrate: exit policy 'vote' is not one of"),
        (["stages.calibrate.max_tokens=120"], r"stages.calibrate: prompt_tokens 6 \+ max_tokens 120 exceed the context "
                                              r"of 16 tokens"),
        (["stages.decode_sweep.thresholds=[1.0,1.2]"], r"stages.decode_sweep.thresholds=\[1.0, 1.2\] must be a "
                                                       r"non-empty list of numbers in \[0, 1\]"),
        (["stages.decode_sweep.prompts=0"], r"stages.decode_sweep.prompts=0 must be an integer >= 1"),
        (["stages.triton.protocol=smtp"], r"stages.triton.protocol='smtp' is not one of \['grpc', 'http'\]"),
        (["stages.triton.queries=[]"], r"stages.triton.queries=\[\] must be a non-empty list"),
        (["+stages.benchmarks.bench_fast={enabled:true}"], r"stages.benchmarks: unknown key\(s\) \['bench_fast'\]"),
        (["stages.benchmarks.bench_decode.enabled=maybe"], r"stages.benchmarks.bench_decode.enabled='maybe' must be "
                                                           r"true or false"),
        (["stages.benchmarks.timeout=0"], r"stages.benchmarks.timeout=0 must be a positive number"),
        (["~stages.benchmarks.bench_tuning"], r"stages.benchmarks.bench_tuning is missing: give scripts/bench_tuning.py "
                                              r"an entry"),
        (["stages.pretrain_plain.nemo=/no/such/plain.nemo"], r"stages.pretrain_plain.nemo=/no/such/plain.nemo: no such file"),
        (["stages.ee_tune.nemo=model.ckpt"], r"stages.ee_tune.nemo=model.ckpt: not a .nemo file"),
        (["stages.add_exits.exit_fractions=[0.25,1.5]"], r"stages.add_exits.exit_fractions: 1.5 is outside \(0, 1\]"),
        (["stages.add_exits.exit_fractions=[0,0.5]"], r"stages.add_exits.exit_fractions: 0 is outside \(0, 1\]"),
        (["stages.add_exits.exit_fractions=[0.25,0.3]"], r"map to layers \[1, 1\]: layer 1 repeats"),
        (["stages.add_exits.init=zeros"], r"stages.add_exits.init='zeros' is not one of \['copy', 'random'\]"),
        (["+stages.evaluate.val_batchez=3"], r"stages.evaluate: unknown key\(s\) \['val_batchez'\]"),
        (["stages.evaluate.val_batches=0"], r"stages.evaluate.val_batches=0 must be an integer >= 1"),
        (["stages.ee_tune.restore_from=x.nemo"], r"stages.ee_tune.restore_from is set by the pipeline"),
        (["stages.ee_tune.pipeline_model_parallel_size=2"], r"stages.ee_tune.pipeline_model_parallel_size=2: the "
                                                             r"pipeline tunes in one process"),
        (["stages.pretrain_ee.skip=yes"], r"stages.pretrain_ee.skip='yes' must be true or false"),
        (["pretrain.model.arch.exit_layer_nums=[1,9]"], r"pretrain recipe for pretrain_ee: exit layer 9 is outside 1..4"),
        (["pretrain.trainer.max_steps=0"], r"pretrain.trainer.max_steps=0 must be an integer >= 1"),
        # the real model's stages (turned on again: SHORT skips them)
        (["stages.real_import.skip=false", "stages.real_import.num_layers=0"],
         r"stages.real_import.num_layers=0 must be null \(all\) or an integer >= 1"),
        (["stages.real_import.skip=false", "stages.real_import.gguf=/no/such.gguf"],
         r"stages.real_import.gguf=/no/such.gguf: no such file"),
        (["stages.real_import.skip=false", "stages.real_add_exits.exit_fractions=[0,0.5]"],
         r"stages.real_add_exits.exit_fractions=\[0, 0.5\] must be a non-empty list of numbers in \(0, 1\]"),
        (["stages.real_import.skip=false", "stages.real_data.max_tokens=0"],
         r"stages.real_data.max_tokens=0 must be an integer >= 1"),
        (["stages.real_import.skip=false", "stages.real_ee_tune.loss=mse"], r"loss='mse' is not one of"),
        (["stages.real_import.skip=false", "stages.real_ee_tune.lstsq_init_windows=-1"],
         r"lstsq_init_windows=-1 must be an integer >= 0"),
        (["stages.real_import.skip=false", "stages.real_ee_tune.output=x.nemo"],
         r"stages.real_ee_tune.output is set by the pipeline"),
        (["stages.real_import.skip=false", "stages.real_calibrate.target=2"], r"stages.real_calibrate: target 2"),
        (["stages.real_import.skip=false", "stages.real_sweep.num_drafts=[0]"],
         r"stages.real_sweep.num_drafts=\[0\] must be a list of integers >= 1"),
        (["stages.triton.chat_queries=[]"], r"stages.triton.chat_queries=\[\] must be a non-empty list"),
    ],
)
def test_bad_config_is_rejected_before_any_work(tmp_path, overrides, message):
    from nemo_ee.pipeline import plan_pipeline, run_pipeline

    cfg = config(tmp_path, *overrides)
    with pytest.raises(ValueError, match=message):
        plan_pipeline(cfg)
    with pytest.raises(ValueError, match="invalid pipeline config"):
        run_pipeline(cfg)
    assert not (tmp_path / "out").exists(), "the run directory was created before the config was validated"


def test_a_bad_given_artefact_is_named(tmp_path):
    from nemo_ee.pipeline import plan_pipeline

    fake = tmp_path / "fake.nemo"
    fake.write_bytes(b"not a tar archive")
    with pytest.raises(ValueError, match=rf"stages.pretrain_ee.nemo={fake}: not a readable .nemo"):
        plan_pipeline(config(tmp_path, f"stages.pretrain_ee.nemo={fake}"))
    with pytest.raises(ValueError, match=r"stages.pretrain_ee.nemo=.* and stages.pretrain_ee.skip=true: choose one"):
        plan_pipeline(config(tmp_path, f"stages.pretrain_ee.nemo={fake}", "stages.pretrain_ee.skip=true"))


def fake_nemo(path, **arch):
    """A .nemo holding only its model_config.yaml (enough for the planner, which never loads weights)."""
    import io
    import tarfile

    data = json.dumps({"arch": arch}).encode()  # JSON is YAML
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_given_models_replace_their_stages_and_are_checked(tmp_path):
    from nemo_ee.pipeline import plan_pipeline

    plain = fake_nemo(tmp_path / "plain.nemo", num_layers=12, exit_layer_nums=[])
    plan = plan_pipeline(config(tmp_path, f"stages.pretrain_plain.nemo={plain}"))
    got = {p.stage.name: p for p in plan}
    assert (got["pretrain_plain"].action, got["pretrain_plain"].artefacts) == (
        "given", {"nemo": str(plain), "exit_layers": []})
    assert got["add_exits"].action == "run"
    # the exit layers come from the given model's depth (2 layers: 1/4 and 1/2 both map to layer 1)
    shallow = fake_nemo(tmp_path / "shallow.nemo", num_layers=2, exit_layer_nums=[])
    with pytest.raises(ValueError, match=r"exit fractions \[0.25, 0.5\] map to layers \[1, 1\]"):
        plan_pipeline(config(tmp_path, f"stages.pretrain_plain.nemo={shallow}"))
    with pytest.raises(ValueError, match=rf"stages.pretrain_ee.nemo={plain} has no exits"):
        plan_pipeline(config(tmp_path, f"stages.pretrain_ee.nemo={plain}"))
    # a given model's identity feeds the hashes downstream: another file, another add_exits config
    other = fake_nemo(tmp_path / "other.nemo", num_layers=12, exit_layer_nums=[])
    again = {p.stage.name: p for p in plan_pipeline(config(tmp_path, f"stages.pretrain_plain.nemo={other}"))}
    assert again["add_exits"].hash != got["add_exits"].hash and again["pretrain_ee"].hash == got["pretrain_ee"].hash


def test_skipping_a_stage_skips_what_needs_it(tmp_path):
    from nemo_ee.pipeline import plan_pipeline

    got = actions(plan_pipeline(config(tmp_path, "stages.pretrain_plain.skip=true")))
    assert got == {
        "corpus": ("run", "not run yet"),
        "pretrain_plain": ("skip", "skip=true"),
        "pretrain_ee": ("run", "not run yet"),
        "add_exits": ("skip", "needs pretrain_plain, which is skipped"),
        "ee_tune": ("skip", "needs add_exits, which is skipped"),
        **{n: ("run", "not run yet") for n in AFTER_TUNING},
        **REAL_SKIPPED,
    }
    got = actions(plan_pipeline(config(tmp_path, "stages.pretrain_ee.skip=true", "stages.add_exits.skip=true")))
    assert got["evaluate"] == ("skip", "needs pretrain_ee or add_exits or ee_tune, which is skipped")
    assert got["calibrate"] == ("skip", "needs pretrain_ee or ee_tune, which is skipped")
    assert got["triton"] == ("skip", "needs calibrate or real_calibrate, which is skipped")
    assert got["benchmarks"] == ("run", "not run yet")  # bench_decode alone needs a model; it says so when run
    # with the real model's stages the Triton stage serves the real model, whatever the tiny stages do
    got = actions(plan_pipeline(config(tmp_path, "stages.pretrain_ee.skip=true", "stages.add_exits.skip=true",
                                       "stages.real_import.skip=false")))
    assert got["triton"] == ("run", "not run yet") and got["calibrate"][0] == "skip"
    assert all(got[n] == ("run", "not run yet") for n in REAL_STAGES)


def _mark_all_done(plan, root):
    """Write the done-markers a finished run leaves, with existing (empty) artefact files."""
    from nemo_ee.pipeline.base import StageResult, write_marker

    for p in plan:
        stage_dir = root / p.stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        nemo = stage_dir / "model.nemo"
        nemo.write_bytes(b"")
        write_marker(stage_dir, p.stage.name, p.hash, "done", StageResult({"nemo": str(nemo)}), 1.0)


def test_resume_reuses_done_stages_and_reruns_what_a_change_touches(tmp_path):
    from nemo_ee.pipeline import plan_pipeline
    from nemo_ee.pipeline.base import write_marker

    root = tmp_path / "out" / "run"
    first = [p for p in plan_pipeline(config(tmp_path)) if p.stage.name not in REAL_SKIPPED]
    assert {p.action for p in first} == {"run"}
    _mark_all_done(first, root)
    assert {n: a for n, (a, _) in actions(plan_pipeline(config(tmp_path))).items()} == {
        **{n: "reuse" for n in STAGE_NAMES}, **{n: "skip" for n in REAL_STAGES}}

    # a tuning setting changes: EE-Tuning and what reads its model rerun, nothing upstream does
    got = actions(plan_pipeline(config(tmp_path, "stages.ee_tune.max_steps=11")))
    assert got == {**{n: ("reuse", "done earlier") for n in STAGE_NAMES[:4]},
                   **{n: ("run", "config changed") for n in ["ee_tune", *AFTER_TUNING]}, **REAL_SKIPPED}
    # a sweep setting reruns the sweep only
    got = actions(plan_pipeline(config(tmp_path, "stages.decode_sweep.repeats=2")))
    assert {n for n, (a, _) in got.items() if a == "run"} == {"decode_sweep"}

    # a deleted artefact makes its stage run again, and every stage that reads it (same config, new input)
    (root / "add_exits" / "model.nemo").unlink()
    got = actions(plan_pipeline(config(tmp_path)))
    assert got["add_exits"] == ("run", "incomplete") and got["ee_tune"] == ("run", "add_exits runs again")
    assert got["evaluate"] == ("run", "add_exits runs again") and got["calibrate"] == ("run", "ee_tune runs again")
    assert got["pretrain_ee"] == ("reuse", "done earlier")
    # rerun=true on a stage reruns what reads it, too
    got = actions(plan_pipeline(config(tmp_path, "stages.calibrate.rerun=true")))
    assert {n for n, (a, _) in got.items() if a == "run"} >= {"calibrate", "decode_sweep", "triton", "benchmarks"}
    assert got["triton"] == ("run", "calibrate runs again")
    _mark_all_done(plan_pipeline(config(tmp_path)), root)

    # an interrupted pretraining (marker 'running', same config) resumes
    write_marker(root / "pretrain_ee", "pretrain_ee", first[2].hash, "running")
    assert actions(plan_pipeline(config(tmp_path)))["pretrain_ee"] == ("run", "interrupted earlier: resuming")

    # a changed pretraining recipe would resume foreign checkpoints: an error unless rerun=true
    with pytest.raises(ValueError, match=r"stages.pretrain_plain: .*pretrain_plain was made with another config "
                                         r"\(hash [0-9a-f]{16}, now [0-9a-f]{16}\).*stages.pretrain_plain.rerun=true"):
        plan_pipeline(config(tmp_path, "pretrain.trainer.max_steps=7"))
    got = actions(plan_pipeline(config(tmp_path, "pretrain.trainer.max_steps=7", "stages.pretrain_plain.rerun=true",
                                       "stages.pretrain_ee.rerun=true")))
    assert got["pretrain_plain"] == ("run", "rerun=true") and got["add_exits"] == ("run", "config changed")
    assert got["corpus"] == ("reuse", "done earlier")


def test_validation_windows_are_spread_fixed_and_clamped_to_the_split():
    from nemo_ee.pipeline.evaluate import validation_windows

    assert validation_windows(10, 2, 3) == [[0, 1, 3], [5, 6, 8]]
    assert validation_windows(10, 2, 3) == validation_windows(10, 2, 3)
    assert validation_windows(10, 5, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # 15 > 10 windows: 3 batches
    with pytest.raises(ValueError, match=r"batch_size=3 windows, but the validation split has only 2"):
        validation_windows(2, 1, 3)
    with pytest.raises(ValueError, match=r"val_batches=0 must be an integer >= 1"):
        validation_windows(10, 0, 3)


def test_report_keeps_stage_order_and_sections():
    from nemo_ee.pipeline.report import Section, markdown_table, render_report

    text = render_report("r", [["corpus", "ran", "1.0s"]], [Section("A", "alpha"), Section("B", "beta")])
    assert text.index("## Stages") < text.index("## A") < text.index("alpha") < text.index("## B")
    assert markdown_table(["x", "loss"], [["exit", 1.23456], ["final", None]]).splitlines() == [
        "| x | loss |", "|---|---:|", "| exit | 1.2346 |", "| final | — |"]


def test_result_lines_and_loss_logs_are_parsed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from nemo_ee.pipeline.curves import tee_stdout, tensorboard_curves, tuning_curves
    from nemo_ee.pipeline.stage_serve import parse_result

    assert parse_result("RESULT efficiency=0.704 selfspec_identical=true steps=7") == {
        "efficiency": 0.704, "selfspec_identical": "true", "steps": 7.0}
    log = tmp_path / "tune.log"
    with tee_stdout(log):
        print("step 1/11: exit_l2=5.2576 exit_l4=5.1342")
        print("some other line")
        print("step 11/11: exit_l2=4.2164 exit_l4=4.1831")
    assert tuning_curves(log) == {"exit at layer 2": [(1.0, 5.2576), (11.0, 4.2164)],
                                  "exit at layer 4": [(1.0, 5.1342), (11.0, 4.1831)]}
    assert tuning_curves(tmp_path / "missing.log") == {}
    # two event files (a resumed run): the later value of a step wins; unrelated tags are ignored
    for run, values in ((0, {10: 6.0, 20: 5.0}), (1, {20: 4.5, 30: 4.0})):
        writer = SummaryWriter(str(tmp_path / "tb" / f"version_{run}"))
        for step, value in values.items():
            writer.add_scalar("train_loss", value, step)
            writer.add_scalar("train_exit_l2_loss", value + 1, step)
            writer.add_scalar("lr", 0.1, step)
        writer.add_scalar("val_exit_l2_loss", 7.5, 30)
        writer.close()
    curves = tensorboard_curves(tmp_path / "tb")
    assert list(curves) == ["exit at layer 2", "final", "val exit at layer 2"]
    assert curves["final"] == [(10.0, 6.0), (20.0, 4.5), (30.0, 4.0)]
    assert curves["exit at layer 2"] == [(10.0, 7.0), (20.0, 5.5), (30.0, 5.0)]
    assert curves["val exit at layer 2"] == [(30.0, 7.5)]


# ---------------------------------------------------------------------------------------------- end to end
def triton_unusable():
    """Why the Triton stage cannot run here (None: it can): the deploy package, tritonclient, a tritonserver."""
    try:
        import tritonclient.grpc  # noqa: F401

        from nemo_ee.deploy.triton.server import find_tritonserver

        find_tritonserver()
    except (ImportError, OSError) as exc:
        return f"Triton is not usable here: {exc}"
    return None


def run_script(tmp_path, *args):
    env = dict(os.environ, NEMO_EE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "scripts" / "run_pipeline.py"), f"out_dir={tmp_path / 'out'}",
                           *SHORT, *args], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)


def parse_table(report: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    """(column headers, {row label: cells}) of the first markdown table after ``## heading``."""
    lines = report.split(f"## {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = [[c.strip() for c in row.strip("|").split("|")] for row in lines[start:end]]
    headers, body = table[0], table[2:]
    return headers, {r[0]: r[1:] for r in body}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_pipeline_end_to_end_then_a_rerun_skips_every_stage(tmp_path):
    no_triton = triton_unusable()
    if no_triton:  # explicitly skipped, with the reason, rather than failing on a machine without the extra
        warnings.warn(f"the triton stage is skipped in this run: {no_triton}")
    proc = run_script(tmp_path, "name=e2e", *(["stages.triton.skip=true"] if no_triton else []))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "out" / "e2e"
    info = json.loads((root / "pipeline.json").read_text())
    expected = [(n, "skip" if (n == "triton" and no_triton) or n in REAL_STAGES else "run") for n in ALL_STAGES]
    assert [(s["stage"], s["action"]) for s in info["stages"]] == expected
    for n in ALL_STAGES:
        assert f"=== [{ALL_STAGES.index(n) + 1}/{len(ALL_STAGES)}] {n}: " in proc.stdout

    report = (root / "report.md").read_text()
    headers, rows = parse_table(report, "Validation loss per exit")
    assert headers == ["output", "EE-pretrained", "exits added (untuned)", "EE-tuned"]
    assert list(rows) == ["exit at layer 1 of 4", "exit at layer 2 of 4", "final (layer 4)"]
    values = {label: [float(c) for c in cells] for label, cells in rows.items()}
    assert all(math.isfinite(v) and 0 < v < 10 for cells in values.values() for v in cells), values
    losses = json.loads((root / "evaluate" / "val_loss.json").read_text())["models"]
    tuned, added = losses["EE-tuned"]["losses"], losses["exits added (untuned)"]["losses"]
    assert tuned["final"] == added["final"], "EE-Tuning changed the frozen backbone's final output"
    for layer in (1, 2):  # ten tuning steps lower each exit's validation loss (seeded, deterministic)
        assert tuned[f"exit_l{layer}"] < added[f"exit_l{layer}"], (layer, tuned, added)
    assert values["exit at layer 1 of 4"][2] == pytest.approx(tuned["exit_l1"], abs=5e-5)
    width, height = png_size(root / "evaluate" / "val_loss_per_exit.png")
    assert width >= 600 and height >= 400 and (root / "evaluate" / "val_loss_per_exit.png").stat().st_size > 10_000
    assert "![validation loss per exit](evaluate/val_loss_per_exit.png)" in report
    _, corpus = parse_table(report, "Corpus and tokenizer")
    assert int(corpus["train"][0]) + int(corpus["val"][0]) == 20  # max_files=20

    check_later_stages(root, report, no_triton)

    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.nemo")}
    assert len(stamps) == 6  # four models and two calibrated copies
    again = run_script(tmp_path, "name=e2e")
    assert again.returncode == 0, again.stderr[-3000:]
    info = json.loads((root / "pipeline.json").read_text())
    assert [(s["stage"], s["action"]) for s in info["stages"]] == [
        (n, "skip" if n in REAL_STAGES else "reuse") for n in ALL_STAGES]
    assert info["wall_time_s"] < 5
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.nemo")} == stamps
    assert parse_table((root / "report.md").read_text(), "Validation loss per exit")[1] == rows


def table_rows(report: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """(column headers, rows) of the first markdown table after ``## heading`` (rows may repeat a label)."""
    headers, _ = parse_table(report, heading)
    lines = report.split(f"## {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return headers, [[c.strip() for c in row.strip("|").split(" | ")] for row in lines[start + 2:end]]


def check_later_stages(root: Path, report: str, no_triton) -> None:
    """Loss curves, calibration, sweep, exit shares, samples, Triton answers and RESULT lines: present and sane."""
    import re

    from nemo_ee.inference.render import marked_depths, strip_marks
    from nemo_ee.tuning.add_exits import read_nemo_config

    def stage_json(name):
        return json.loads((root / name / "stage.json").read_text())

    # every plot the report links exists and is a real, readable-size PNG
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert sorted(images) == sorted(["loss_curves/loss_curves.png", "evaluate/val_loss_per_exit.png",
                                     "decode_sweep/speedup_agreement.png", "decode_sweep/exit_share.png"])
    for image in images:
        width, height = png_size(root / image)
        assert width >= 600 and height >= 400 and (root / image).stat().st_size > 10_000, image

    # loss curves: both pretrainings from TensorBoard (6 steps, logged every 2) and EE-Tuning's log (every 3 of 10)
    curves = json.loads((root / "loss_curves" / "loss_curves.json").read_text())
    assert set(curves["Pretraining: early-exit GPT"]) >= {"exit at layer 1", "exit at layer 2", "final",
                                                         "val exit at layer 1", "val final"}
    assert "final" in curves["Pretraining: plain GPT"] and "exit at layer 1" not in curves["Pretraining: plain GPT"]
    tune = stage_json("ee_tune")["artefacts"]
    tuning = curves["EE-Tuning (backbone frozen)"]
    for index, layer in enumerate((1, 2)):  # the log's first/last points are tune_nemo's first/last losses
        points = tuning[f"exit at layer {layer}"]
        assert [p[0] for p in points] == [1.0, 4.0, 7.0, 10.0]
        assert points[0][1] == pytest.approx(tune["first"][str(index)], abs=6e-5)
        assert points[-1][1] == pytest.approx(tune["last"][str(index)], abs=6e-5)
    for label in ("exit at layer 1", "final", "val final"):
        steps = [p[0] for p in curves["Pretraining: early-exit GPT"][label]]
        assert steps == ([5.0, 6.0] if label.startswith("val") else [1.0, 3.0, 5.0]), (label, steps)
    _, rows = table_rows(report, "Loss curves per exit")
    assert all(math.isfinite(float(r[2])) and math.isfinite(float(r[3])) for r in rows) and len(rows) >= 8

    # calibration: thresholds in each calibrated .nemo, agreement measured >= the target when met
    cal = stage_json("calibrate")["artefacts"]["models"]
    assert set(cal) == {"pretrain_ee", "ee_tune"}
    for m in cal.values():
        section = read_nemo_config(m["nemo"]).inference
        assert {int(k): float(v) for k, v in section.exit_thresholds.items()} == {int(k): v for k, v in
                                                                                 m["thresholds"].items()}
        assert section.calibration.target == 0.98 and (m["agreement"] >= 0.98) == m["met"]
    headers, rows = table_rows(report, "Calibrated exit thresholds")
    assert [r[0] for r in rows] == ["EE-pretrained", "EE-tuned"]
    assert [float(r[2]) for r in rows] == [pytest.approx(cal[n]["agreement"], abs=1e-4) for n in ("pretrain_ee", "ee_tune")]

    # sweep: threshold 1.0 never exits (depth 4, agreement 1); 0.0 always leaves at the first exit (depth 1)
    sweep = json.loads((root / "decode_sweep" / "sweep.json").read_text())
    assert set(sweep) == {"EE-pretrained", "EE-tuned"}
    for label, result in sweep.items():
        by_t = {r["threshold"]: r for r in result["rows"]}
        assert sorted(by_t) == [0.0, 0.5, 1.0]
        assert (by_t[1.0]["mean_depth"], by_t[1.0]["agreement"], by_t[1.0]["ideal_speedup"]) == (4.0, 1.0, 1.0)
        assert (by_t[0.0]["mean_depth"], by_t[0.0]["share_l1"], by_t[0.0]["ideal_speedup"]) == (1.0, 1.0, 4.0)
        for r in result["rows"]:
            assert sum(r[f"share_l{d}"] for d in (1, 2, 4)) == pytest.approx(1.0)
            assert r["speedup"] > 0 and 0 <= r["agreement"] <= 1
        share = result["calibrated"]["exit_share"]
        assert sum(share.values()) == pytest.approx(1.0) and result["calibrated"]["tokens"] == 2 * 8
    headers, rows = table_rows(report, "Early-exit decoding: speedup and agreement against threshold")
    assert headers[:5] == ["model", "threshold", "speedup", "ideal speedup", "agreement"] and len(rows) == 6
    assert [(r[0], float(r[1]), float(r[5])) for r in rows if float(r[1]) in (0.0, 1.0)] == [
        (lab, t, d) for lab in ("EE-pretrained", "EE-tuned") for t, d in ((1.0, 4.0), (0.0, 1.0))]
    headers, rows = table_rows(report, "Share of tokens per exit")
    assert headers[3:] == ["exit at layer 1", "exit at layer 2", "final (layer 4)"]
    assert all(sum(float(c) for c in r[3:]) == pytest.approx(1.0, abs=2e-3) for r in rows)

    # samples: three prompts per model, one ⟨depth⟩ per generated token, text = the decoded tokens
    samples = report.split("## Sample generations\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```text\n(.*?)\n```", samples, re.S)
    expected = [s for r in sweep.values() for s in r["samples"]]
    assert len(blocks) == len(expected) == 6
    for block, sample in zip(blocks, expected):
        assert block == sample["prompt"] + sample["marked"]
        assert marked_depths(sample["marked"]) == sample["exit_layers"] and 1 <= len(sample["exit_layers"]) <= 6
        assert set(sample["exit_layers"]) <= {1, 2, 4} and strip_marks(sample["marked"]) == sample["text"]

    # Triton: every answer came back through tritonclient and equals decoding in-process
    if no_triton:
        assert "## Serving on Triton" not in report
    else:
        answers = json.loads((root / "triton" / "answers.json").read_text())["answers"]
        assert [a["prompt"] for a in answers] == ["def main(", "from os import ", "    return "]
        assert all(a["same_as_local"] and 1 <= len(a["output_ids"]) <= 6 for a in answers), answers
        _, rows = table_rows(report, "Serving on Triton")
        assert [r[-1] for r in rows] == ["yes"] * 3

    # benchmarks: the enabled ones ran and their RESULT line is in the table; the disabled ones say so
    results = json.loads((root / "benchmarks" / "results.json").read_text())
    assert {k: v["status"] for k, v in results.items()} == {
        "bench_bubble_fill": "disabled", "bench_decode": "ok", "bench_pipeline_comm": "disabled",
        "bench_real_model": "skipped: no calibrated real model in this run",
        "bench_train_overhead": "disabled", "bench_tuning": "ok", "bench_triton": "disabled"}
    assert results["bench_decode"]["values"]["selfspec_identical"] == "true"
    assert 0 < results["bench_tuning"]["values"]["time_ratio"] and 0 < results["bench_tuning"]["values"]["memory_ratio"] < 1
    _, rows = parse_table(report, "Benchmarks (RESULT lines)")
    assert rows["`bench_decode.py`"][3] == f"`{results['bench_decode']['result']}`"
    assert rows["`bench_tuning.py`"][3].startswith("`RESULT time_ratio=") and rows["`bench_train_overhead.py`"][1] == "disabled"
