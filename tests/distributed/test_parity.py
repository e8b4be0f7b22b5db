"""3D-parallel parity and distributed checkpoints, under torchrun on CPU (gloo).

One module-scoped fixture runs every process launch once (reference, reshard script, the 2-process
variants, an interrupted save, the final single-process checks); the tests then compare files:

- one training step at PP=2 / TP=2 / DP=2 from the same initial weights equals the TP=PP=DP=1
  reference: final and per-exit losses, the grad norm, every parameter and Adam moment afterwards;
- a checkpoint saved at one layout loads into another with the same logits (final and exits);
- scripts/reshard.py converts TP1PP1 <-> TP2 and TP1PP1 <-> PP2 bit-exactly;
- a save SIGKILLed mid-way leaves the previous checkpoint intact and loadable.
"""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "_parity_worker.py"
RESHARD = REPO / "scripts" / "reshard.py"

BASE = dict(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64, seq_length=8)
CASES = {
    # both exits on stage 0 at PP=2 (layers 1, 2); norm-only heads, untied; exit-only stage 0 loss path
    "stage0_norm": dict(BASE, exit_layer_nums=[1, 2], exit_loss_weights=[0.5, 0.3]),
    # one exit per stage; block + MLP + norm heads, untied backbone, temperature and dynamic token weight
    "both_block_mlp": dict(BASE, exit_layer_nums=[1, 3], exit_block=True, exit_mlp=True,
                           share_embeddings_and_output_weights=False, exit_logit_temperature=[1.0, 2.0],
                           exit_dynamic_token_weight=[True, False], exit_loss_weights=[0.7, 0.4]),
    # tied exits (the one after layer 1 on stage 0 of PP=2 uses the word embedding); block + norm heads
    "tied_block": dict(BASE, exit_layer_nums=[1, 3], exit_block=True, tie_exit_output=True,
                       exit_loss_weights=[0.6, 0.2]),
}
CLIP = {"stage0_norm": 1.0, "both_block_mlp": 1.0, "tied_block": 0.5}  # 0.5 < grad norm: clipping active
LAYOUTS = {"pp2": (1, 2), "tp2": (2, 1), "dp2": (1, 1)}  # (tp, pp) at 2 processes; DP = 2 / (tp * pp)
RESHARD_CASE = {"tp2": "both_block_mlp", "pp2": "tied_block"}  # TP-sharded exit blocks; tied exit on stage 0
# Big enough that a save takes a while (tens of MB); the killed save is held mid-way, see _parity_worker.
BIG = dict(num_layers=4, hidden_size=256, num_attention_heads=8, ffn_hidden_size=1024, vocab_size=4096,
           seq_length=16, exit_layer_nums=[2], exit_mlp=True)

# fp32 tolerances: PP and DP compute the same ops in the same order as the reference (differences come
# only from gradient all-reduces); TP splits matmuls and all-reduces partial sums, hence more rounding.
PARAM_TOL = {"pp2": dict(rtol=1e-5, atol=1e-6), "dp2": dict(rtol=1e-5, atol=1e-6), "tp2": dict(rtol=1e-5, atol=2e-6)}
LOGIT_TOL = dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ launching
def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, *args, nproc=1, torchrun=None, timeout=300, check=True):
    """``script`` as one plain process (nproc=1) or under torchrun; returns the CompletedProcess."""
    if torchrun or nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *map(str, args)]
    else:
        cmd = [sys.executable, str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    if check:
        assert proc.returncode == 0, f"{cmd}\n" + proc.stdout[-3000:] + proc.stderr[-8000:]
    return proc


def run_jobs(jobs, path, nproc=1):
    path.write_text(json.dumps(jobs))
    launch(WORKER, path, nproc=nproc)


def _tree_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _interrupted_save(jobs_file, ckpt, log):
    """Start a save over ``ckpt`` in a subprocess and SIGKILL it once its data file is being written."""
    jobs_file.write_text(json.dumps([dict(kind="init", cfg=BIG, seed=2, ckpt=str(ckpt), slow_fsync=True)]))
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(jobs_file)], env=_env(), cwd=REPO,
                                stdout=err, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while True:
            tmps = list(ckpt.parent.glob(f"{ckpt.name}.tmp-*"))
            if tmps and any(f.stat().st_size > 0 for f in tmps[0].glob("*.distcp")):
                break
            assert proc.poll() is None, f"the save ended before it could be killed:\n{Path(log).read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the save never started writing"
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's session: the save and nothing else
        proc.wait(timeout=30)
    return tmps[0], proc.returncode


# ------------------------------------------------------------------------------------------ the runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    ref_jobs = []
    for name, cfg in CASES.items():
        ref_jobs += [
            dict(kind="init", cfg=cfg, seed=7, ckpt=str(d / f"init_{name}")),
            dict(kind="logits", cfg=cfg, ckpt=str(d / f"init_{name}"), out=str(d / f"lg_init_{name}_ref")),
            dict(kind="train", cfg=cfg, init_ckpt=str(d / f"init_{name}"), out_ckpt=str(d / f"after_{name}_ref"),
                 losses=str(d / f"loss_{name}_ref.json"), clip_grad=CLIP[name], save_optimizer=True),
        ]
    big = d / "big"
    ref_jobs += [dict(kind="init", cfg=BIG, seed=1, ckpt=str(big)),
                 dict(kind="logits", cfg=BIG, ckpt=str(big), out=str(d / "lg_big_before"))]
    run_jobs(ref_jobs, d / "ref.json")

    # reshard script, TP1PP1 -> TP2 and TP1PP1 -> PP2 (2 processes each)
    for lay, (tp, pp) in (("tp2", (2, 1)), ("pp2", (1, 2))):
        launch(RESHARD, "--in", d / f"init_{RESHARD_CASE[lay]}", "--out", d / f"rs_{lay}", "--tp", tp, "--pp", pp,
               nproc=2)

    # the 2-process variants: every case at PP=2, TP=2, DP=2 in one launch
    var_jobs = []
    for name, cfg in CASES.items():
        for lay, (tp, pp) in LAYOUTS.items():
            var_jobs.append(dict(kind="train", cfg=cfg, tp=tp, pp=pp, init_ckpt=str(d / f"init_{name}"),
                                 out_ckpt=str(d / f"after_{name}_{lay}"), losses=str(d / f"loss_{name}_{lay}.json"),
                                 clip_grad=CLIP[name], save_optimizer=True))
            if lay != "dp2":
                var_jobs += [
                    dict(kind="logits", cfg=cfg, tp=tp, pp=pp, ckpt=str(d / f"init_{name}"),
                         out=str(d / f"lg_init_{name}_{lay}")),
                    dict(kind="logits", cfg=cfg, tp=tp, pp=pp, ckpt=str(d / f"after_{name}_{lay}"),
                         out=str(d / f"lg_after_{name}_{lay}")),
                ]
    for lay, (tp, pp) in (("tp2", (2, 1)), ("pp2", (1, 2))):
        var_jobs.append(dict(kind="logits", cfg=CASES[RESHARD_CASE[lay]], tp=tp, pp=pp, ckpt=str(d / f"rs_{lay}"),
                             out=str(d / f"lg_rs_{lay}")))
    run_jobs(var_jobs, d / "var.json", nproc=2)

    # reshard back to TP1PP1: once as a plain process, once under torchrun with one process
    launch(RESHARD, "--in", d / "rs_tp2", "--out", d / "rs_tp2_back")
    launch(RESHARD, "--in", d / "rs_pp2", "--out", d / "rs_pp2_back", "--tp", 1, "--pp", 1, torchrun=True)

    # a save over `big` killed mid-way
    big_digest = _tree_digest(big)
    tmp_dir, kill_rc = _interrupted_save(d / "kill.json", big, d / "kill.log")
    after_kill = {"digest": _tree_digest(big), "tmp_left": tmp_dir.is_dir(), "rc": kill_rc,
                  "tmp_has_marker": (tmp_dir / "metadata.json").exists()}

    # final single process: everything loaded back into TP1PP1
    fin = []
    for name, cfg in CASES.items():
        fin.append(dict(kind="dump", cfg=cfg, ckpt=str(d / f"init_{name}"), out=str(d / f"dump_init_{name}.pt")))
        for lay in ("ref", *LAYOUTS):
            fin.append(dict(kind="dump", cfg=cfg, ckpt=str(d / f"after_{name}_{lay}"), optimizer=True,
                            out=str(d / f"dump_after_{name}_{lay}.pt")))
        for lay in ("tp2", "pp2"):
            fin.append(dict(kind="logits", cfg=cfg, ckpt=str(d / f"after_{name}_{lay}"),
                            out=str(d / f"lg_after_{name}_{lay}_tp1")))
    for lay in ("tp2", "pp2"):
        cfg = CASES[RESHARD_CASE[lay]]
        fin += [dict(kind="dump", cfg=cfg, ckpt=str(d / f"rs_{lay}"), out=str(d / f"dump_rs_{lay}.pt")),
                dict(kind="dump", cfg=cfg, ckpt=str(d / f"rs_{lay}_back"), out=str(d / f"dump_rs_{lay}_back.pt")),
                dict(kind="logits", cfg=cfg, ckpt=str(d / f"rs_{lay}_back"), out=str(d / f"lg_rs_{lay}_back"))]
    for name, exits in (("more_exits", [1, 2, 3]), ("fewer_exits", [1]), ("moved_exit", [1, 3])):
        cfg = dict(CASES["stage0_norm"], exit_layer_nums=exits, exit_loss_weights=1.0)
        fin.append(dict(kind="mismatch", cfg=cfg, ckpt=str(d / "init_stage0_norm"), out=str(d / f"mismatch_{name}.json")))
    fin += [
            dict(kind="logits", cfg=BIG, ckpt=str(big), out=str(d / "lg_big_after_kill")),
            dict(kind="init", cfg=BIG, seed=3, ckpt=str(big))]  # a later save replaces it, clears the stale tmp
    run_jobs(fin, d / "final.json")
    after_kill["tmp_after_next_save"] = sorted(p.name for p in d.glob("big.tmp-*"))
    after_kill["old_after_next_save"] = sorted(p.name for p in d.glob("big.old-*"))
    return dict(dir=d, big_digest=big_digest, after_kill=after_kill)


def logits(d, prefix):
    merged = {}
    for f in sorted(d.glob(f"{prefix}.rank*.pt")):
        part = torch.load(f, weights_only=True)
        assert not set(part) & set(merged), f"{f}: the same output on two ranks"
        merged.update(part)
    assert merged, f"no logits written for {prefix}"
    return merged


def assert_logits(expected, actual, exact):
    assert sorted(expected) == sorted(actual)
    for key in expected:
        if exact:
            assert torch.equal(expected[key], actual[key]), f"{key}: max diff {(expected[key] - actual[key]).abs().max()}"
        else:
            torch.testing.assert_close(actual[key], expected[key], **LOGIT_TOL, msg=lambda m: f"{key}: {m}")


def assert_same_tensors(expected, actual, exact=False, **tol):
    assert sorted(expected) == sorted(actual), set(expected) ^ set(actual)
    for key in expected:
        if exact:
            assert torch.equal(expected[key], actual[key]), f"{key} differs"
        else:
            torch.testing.assert_close(actual[key], expected[key], **tol, msg=lambda m: f"{key}: {m}")


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_one_training_step_matches_single_process(runs, case, layout):
    d = runs["dir"]
    ref = json.loads((d / f"loss_{case}_ref.json").read_text())
    var = json.loads((d / f"loss_{case}_{layout}.json").read_text())
    assert ref["step_ok"] and var["step_ok"]
    assert var["dp"] == (2 if layout == "dp2" else 1) and var["num_microbatches"] * var["dp"] == ref["num_microbatches"]
    assert sorted(var["losses"]) == ["exit0", "exit1", "final"]
    for key, value in ref["losses"].items():
        assert var["losses"][key] == pytest.approx(value, rel=1e-5), f"{key} loss"
    assert var["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)  # gradient scale, before clipping
    ref_state = torch.load(d / f"dump_after_{case}_ref.pt", weights_only=True)
    var_state = torch.load(d / f"dump_after_{case}_{layout}.pt", weights_only=True)
    init = torch.load(d / f"dump_init_{case}.pt", weights_only=True)["params"]
    assert all(not torch.equal(init[k], ref_state["params"][k]) for k in init), "some parameter did not train"
    assert_same_tensors(ref_state["params"], var_state["params"], **PARAM_TOL[layout])
    assert sorted(ref_state["adam"]) == sorted(ref_state["params"])  # saved + resharded optimizer moments
    for name, moments in ref_state["adam"].items():
        assert_same_tensors(moments, var_state["adam"][name], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_loads_across_layouts_with_same_logits(runs, case, layout):
    d = runs["dir"]
    exact = layout == "pp2"  # PP runs the very same ops; TP rounds differently
    # saved at TP1PP1, loaded at TP2 / PP2
    assert_logits(logits(d, f"lg_init_{case}_ref"), logits(d, f"lg_init_{case}_{layout}"), exact)
    # saved at TP2 / PP2 (after the training step), loaded at TP1PP1
    assert_logits(logits(d, f"lg_after_{case}_{layout}"), logits(d, f"lg_after_{case}_{layout}_tp1"), exact)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_reshard_script_round_trip_is_exact(runs, layout):
    d, case = runs["dir"], RESHARD_CASE[layout]
    init = torch.load(d / f"dump_init_{case}.pt", weights_only=True)["params"]
    assert_same_tensors(init, torch.load(d / f"dump_rs_{layout}.pt", weights_only=True)["params"], exact=True)  # TP1PP1 -> layout
    assert_same_tensors(init, torch.load(d / f"dump_rs_{layout}_back.pt", weights_only=True)["params"], exact=True)  # and back
    reference = logits(d, f"lg_init_{case}_ref")
    assert_logits(reference, logits(d, f"lg_rs_{layout}"), exact=layout == "pp2")  # computed at the target layout
    assert_logits(reference, logits(d, f"lg_rs_{layout}_back"), exact=True)
    assert json.loads((d / f"rs_{layout}" / "nemo_ee_config.json").read_text())[
        "tensor_model_parallel_size" if layout == "tp2" else "pipeline_model_parallel_size"] == 2


def test_killed_save_leaves_previous_checkpoint_intact(runs):
    d, info = runs["dir"], runs["after_kill"]
    assert info["rc"] == -signal.SIGKILL
    assert info["tmp_left"] and not info["tmp_has_marker"], "the save was not interrupted mid-way"
    assert info["digest"] == runs["big_digest"], "the previous checkpoint's files changed"
    assert_logits(logits(d, "lg_big_before"), logits(d, "lg_big_after_kill"), exact=True)
    assert info["tmp_after_next_save"] == [] and info["old_after_next_save"] == []  # the next save cleans up
    assert _tree_digest(d / "big") != runs["big_digest"]  # ... and replaced the checkpoint


@pytest.mark.parametrize(
    "name, messages",
    [
        ("more_exits", ["the model expects 4 tensor(s) missing from the checkpoint: exits.2.norm.bias, "
                        "exits.2.norm.weight, exits.2.output_layer._extra_state, exits.2.output_layer.weight"]),
        ("fewer_exits", ["the checkpoint has 4 tensor(s) the model does not: exits.1.norm.bias, exits.1.norm.weight, "
                         "exits.1.output_layer._extra_state, exits.1.output_layer.weight"]),
        # same tensor names and shapes: only the stored config tells that exit 1 moved from layer 2 to 3
        ("moved_exit", ["exit_layer_nums: checkpoint [1, 2], model [1, 3]"]),
    ],
)
def test_load_names_what_does_not_match(runs, name, messages):
    error = json.loads((runs["dir"] / f"mismatch_{name}.json").read_text())
    assert error is not None and error["type"] == "CheckpointMismatchError"
    for message in messages:
        assert message in error["message"], error["message"]


@pytest.mark.parametrize(
    "args, world, message",
    [
        (["--tp", "2"], None, "world size is 1"),
        (["--tp", "1", "--pp", "1"], "2", "world size is 2"),
        (["--tp", "3"], "3", "is not divisible by tensor_model_parallel_size=3"),
    ],
)
def test_reshard_script_rejects_bad_layout_before_any_work(runs, tmp_path, args, world, message):
    src = runs["dir"] / "init_stage0_norm"
    env_world = {} if world is None else {"WORLD_SIZE": world}
    proc = subprocess.run([sys.executable, str(RESHARD), "--in", str(src), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=120, env=dict(_env(), **env_world), cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_reshard_script_rejects_bad_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for src, message in ((tmp_path / "missing", "no such checkpoint folder"),
                         (tmp_path / "empty", "not a complete nemo_ee distributed checkpoint")):
        proc = subprocess.run([sys.executable, str(RESHARD), "--in", str(src), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_swap_interrupted_between_renames_is_recovered(tmp_path):
    """A save that died after setting the old checkpoint aside: the next load/save puts a complete one back."""
    from nemo_ee.checkpoint import dist as ckpt

    def fake(path, tag):
        path.mkdir()
        (path / "metadata.json").write_text("{}")
        (path / ckpt.CONFIG_FILE).write_text(json.dumps({"tag": tag}))

    target = tmp_path / "ckpt"
    fake(tmp_path / "ckpt.old-abc", "old")
    ckpt._recover(target)
    assert json.loads((target / ckpt.CONFIG_FILE).read_text()) == {"tag": "old"}
    assert not (tmp_path / "ckpt.old-abc").exists()

    target2 = tmp_path / "ckpt2"
    fake(tmp_path / "ckpt2.old-xyz", "old")
    fake(tmp_path / "ckpt2.tmp-xyz", "new")  # the new one was complete: it wins
    ckpt._recover(target2)
    assert json.loads((target2 / ckpt.CONFIG_FILE).read_text()) == {"tag": "new"}
