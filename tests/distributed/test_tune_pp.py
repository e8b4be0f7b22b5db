"""EE-Tuning with pipeline parallelism, under torchrun on CPU (gloo).

One module-scoped fixture makes two launches of _tune_pp_worker.py:
- 2 processes: full 6-layer models saved as dist checkpoints at PP=2; the pipeline tuner at PP=2 on three of them;
- 1 process: the TP=PP=1 EETuner reference on the full model, the pipeline tuner at PP=1 (also from a PP=2
  checkpoint whose last exit is at layer 3 = L/2, to show that nothing after it is read).
A second test drives scripts/ee_tune.py under torchrun at PP=2 on a .nemo and compares with the PP=1 run.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "_tune_pp_worker.py"

BASE = dict(num_layers=6, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64, seq_length=12)
CASES = {
    # exits at 2 and 4: one exit per tuning stage at PP=2 (layers 1-2 | 3-4); MLP heads, a weight schedule
    "two_stages": dict(BASE, exit_layer_nums=[2, 4], exit_mlp=True, exit_loss_weights=[0.5, 1.0],
                       exit_loss_init_weights=[0.1, 1.0], exit_loss_warmup_iters=3),
    # last exit at layer 3 = L/2: at PP=2 the checkpoint's second stage holds layers 4-6 and the final norm
    "half_depth": dict(BASE, exit_layer_nums=[1, 3]),
    # one exit at layer 4: the first tuning stage (layers 1-2) has no exit, so nothing to train
    "empty_stage": dict(BASE, exit_layer_nums=[4], exit_mlp=True),
    # tied exits: the second stage's exit uses its copy of the word embedding (megatron's embedding group)
    "tied": dict(BASE, exit_layer_nums=[2, 4], tie_exit_output=True),
    # an imported-Llama shape: swiglu (megatron's fc1 sharded-tensor factory), RMSNorm, rope, GQA, untied output;
    # exit blocks (a transformer layer in each exit head)
    "llama_like": dict(BASE, exit_layer_nums=[2, 4], activation="swiglu", normalization="RMSNorm",
                       position_embedding_type="rope", add_bias_linear=False, num_query_groups=2,
                       share_embeddings_and_output_weights=False, exit_block=True),
}
PP2 = ("two_stages", "empty_stage", "tied", "llama_like")
MAX_DIFF = 1e-5


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, *args, nproc=1, cwd=REPO, timeout=300):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(script), *map(str, args)]
    else:
        cmd = [sys.executable, str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd)
    assert proc.returncode == 0, f"{cmd}\n" + proc.stdout[-3000:] + proc.stderr[-8000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune_pp")
    two = [dict(kind="init", cfg=cfg, pp=2, seed=i + 1, ckpt=str(d / f"ck_{name}")) for i, (name, cfg) in
           enumerate(CASES.items())]
    two += [dict(kind="tune", cfg=CASES[n], pp=2, microbatches=2, ckpt=str(d / f"ck_{n}"), out=str(d / f"pp2_{n}"))
            for n in PP2]
    one = [dict(kind="ref", cfg=CASES[n], ckpt=str(d / f"ck_{n}"), out=str(d / f"ref_{n}")) for n in PP2]
    one += [dict(kind="tune", cfg=CASES[n], pp=1, microbatches=1, ckpt=str(d / f"ck_{n}"), out=str(d / f"pp1_{n}"))
            for n in ("two_stages", "half_depth")]
    (d / "two.json").write_text(json.dumps(two))
    (d / "one.json").write_text(json.dumps(one))
    launch(WORKER, d / "two.json", nproc=2)
    launch(WORKER, d / "one.json")
    return d


def _exits(d, name):
    return load_file(str(d / f"{name}.exits.safetensors"))


def _report(d, name):
    return json.loads((d / f"{name}.json").read_text())


def nemo_weights(path):
    """The tensors of a .nemo's safetensors weights."""
    import tarfile

    from safetensors.torch import load

    with tarfile.open(str(path), "r:*") as tar:
        (member,) = [m for m in tar.getmembers() if m.name.endswith("model_weights.safetensors")]
        return load(tar.extractfile(member).read())


def _max_diff(a, b):
    assert sorted(a) == sorted(b) and a, (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("case", PP2)
def test_pp2_tuning_matches_pp1(runs, case):
    """5 steps, same data, AdamW: PP=2 (2 micro-batches) and the TP=PP=1 EETuner give the same exits."""
    ref, pp2 = _exits(runs, f"ref_{case}"), _exits(runs, f"pp2_{case}")
    assert len(ref) >= 3 and all(k.startswith("exits.") for k in ref)
    assert _max_diff(ref, pp2) <= MAX_DIFF  # every exit tensor of every stage
    ref_losses, pp2_losses = _report(runs, f"ref_{case}")["losses"], _report(runs, f"pp2_{case}")["losses"]
    for a, b in zip(ref_losses, pp2_losses, strict=True):
        assert sorted(a) == sorted(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6)
    if case == "two_stages":  # the pipeline tuner at PP=1 too
        assert _max_diff(ref, _exits(runs, "pp1_two_stages")) <= MAX_DIFF


def test_exit_losses_fall_and_backbone_is_untouched(runs):
    report = _report(runs, "pp2_two_stages")
    first, last = report["losses"][0], report["losses"][-1]
    for k in ("0", "1"):
        assert last[k] < 0.97 * first[k], (first, last)
    ranks = report["ranks"]
    assert [r["exits"] for r in ranks] == [[0], [1]] and [r["layers"] for r in ranks] == [2, 2]
    # forward-only pipeline: stage 0 sends one hidden state per micro-batch (5 steps x 2), stage 1 receives them;
    # no message goes backwards (no gradient crosses a stage)
    assert [r["messages"] for r in ranks] == [{"send_next": 10, "recv_prev": 0, "send_prev": 0, "recv_next": 0},
                                              {"send_next": 0, "recv_prev": 10, "send_prev": 0, "recv_next": 0}]
    for r in ranks:
        assert r["backbone_unchanged"] and r["backbone_no_grad"] and r["has_trainable"]
        assert not r["has_output_layer"] and not r["has_final_norm"]  # layers after the last exit: not built


def test_stage_without_exits_is_a_no_op(runs):
    ranks = _report(runs, "pp2_empty_stage")["ranks"]
    assert [r["has_trainable"] for r in ranks] == [False, True] and [r["exits"] for r in ranks] == [[], [0]]
    assert all(r["backbone_unchanged"] for r in ranks)
    assert not any(n.startswith("exits.") for n in ranks[0]["names"])


def test_smaller_tuning_pp_reads_only_the_layers_up_to_the_last_exit(runs):
    """A PP=2 checkpoint (6 layers, last exit at 3) tuned at PP=1: layers 4-6 and the final norm are not read."""
    (info,) = _report(runs, "pp1_half_depth")["ranks"]
    layers = sorted({int(n.split(".")[2]) for n in info["names"] if n.startswith("decoder.layers.")})
    assert layers == [0, 1, 2]  # 0-based: layers 1..3
    assert len([n for n in info["names"] if n.startswith("decoder.layers.")]) == 3 * 12
    assert not any("final_layernorm" in n or n.startswith("output_layer") for n in info["names"])
    assert sorted(n for n in info["names"] if not n.startswith("decoder.")) == [
        "embedding.position_embeddings.weight", "embedding.word_embeddings.weight",
        "exits.0.norm.bias", "exits.0.norm.weight", "exits.0.output_layer.weight",
        "exits.1.norm.bias", "exits.1.norm.weight", "exits.1.output_layer.weight"]
    # the checkpoint's second stage wrote __1_0.distcp (layers 4-6, final norm); it is never opened
    assert (runs / "ck_half_depth" / "__1_0.distcp").is_file()
    assert info["opened"] == [".metadata", "__0_0.distcp"]
    assert info["layers"] == 3 and info["has_trainable"]


def test_tuning_pp_must_divide_the_depth_up_to_the_last_exit():
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.tuning.pipeline import tuning_config

    cfg = EarlyExitConfig.from_dict(CASES["half_depth"])
    with pytest.raises(ValueError, match=r"pipeline_model_parallel_size=2 must divide the 3 layers up to the last "
                                         r"exit \(layer 3\); allowed: \[1, 3\]"):
        tuning_config(cfg, 2)
    assert tuning_config(cfg, 3).num_layers == 3
    with pytest.raises(ValueError, match="no exits"):
        tuning_config(EarlyExitConfig.from_dict(dict(BASE, exit_layer_nums=[])), 1)


# ------------------------------------------------------------------------------------------ the script
@pytest.mark.slow
def test_ee_tune_script_pp2_matches_pp1(tmp_path, single_process):
    """torchrun scripts/ee_tune.py pipeline_model_parallel_size=2 on a .nemo = the PP=1 run; backbone bit-identical."""
    from omegaconf import OmegaConf

    from nemo_ee.data import CorpusSpec, train_tokenizer
    from nemo_ee.tuning import add_exits
    from nemo_ee.tuning.ee_tune import tune_nemo
    from tests.tuning.test_add_exits import saved

    tok = str(train_tokenizer(CorpusSpec(max_files=5), 300, tmp_path / "tok"))
    _, src_model = saved(tmp_path, tok)
    src = tmp_path / "ee.nemo"
    add_exits(src_model, [1, 2], exit_loss_weights=[0.5, 1.0], init="random", exit_mlp=True).save_to(str(src))
    outs = {pp: tmp_path / f"tuned_pp{pp}.nemo" for pp in (1, 2)}
    common = ["max_steps=4", "micro_batch_size=2", "data.max_files=5", "optim.lr=1e-2"]
    # PP=1: tune_nemo in this process (the TP=PP=1 EETuner on the restored NeMo model)
    cfg = OmegaConf.load(REPO / "conf" / "ee_tuning.yaml")
    cfg.merge_with_dotlist([f"restore_from={src}", f"output={outs[1]}", *common])
    tune_nemo(cfg)
    # PP=2: the script under torchrun, one process per stage
    run = launch(REPO / "scripts" / "ee_tune.py", f"restore_from={src}", f"output={outs[2]}", *common,
                 "pipeline_model_parallel_size=2", f"hydra.run.dir={tmp_path / 'h'}", nproc=2, cwd=tmp_path)
    assert "step 4/4: exit_l1=" in run.stdout, run.stdout[-2000:]
    source, pp1, pp2 = nemo_weights(src), nemo_weights(outs[1]), nemo_weights(outs[2])
    assert source.keys() == pp1.keys() == pp2.keys()
    for key in source:
        if not key.startswith("model.exits."):
            assert torch.equal(source[key], pp2[key]), key  # backbone bit-identical
    exits = [k for k in source if k.startswith("model.exits.")]
    assert len(exits) >= 6 and len(source) - len(exits) >= 30
    assert any(not torch.equal(source[k], pp2[k]) for k in exits)  # the exits did train
    assert _max_diff({k: pp1[k] for k in exits}, {k: pp2[k] for k in exits}) <= MAX_DIFF
