"""The pipeline tuner and partial-stage loading in one process (PP=1); PP=2 is in tests/distributed/test_tune_pp.py."""
import pytest
import torch

from nemo_ee.config import EarlyExitConfig

B, S, V = 4, 12, 64


def cfg(**kw):
    base = dict(num_layers=6, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=V, seq_length=S,
                exit_layer_nums=[2, 4], exit_mlp=True)
    base.update(kw)
    return EarlyExitConfig(**base)


def batch(step):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    return {"tokens": tokens, "labels": (tokens + 1) % V, "loss_mask": mask,
            "position_ids": torch.arange(S).expand(B, S).contiguous()}


LLAMA_LIKE = dict(activation="swiglu", normalization="RMSNorm", position_embedding_type="rope", add_bias_linear=False,
                  num_query_groups=2, share_embeddings_and_output_weights=False, exit_block=True)


@pytest.fixture(params=["gpt", "llama_like"])
def full_and_ckpt(single_process, tmp_path, request):
    """A full model saved as a dist checkpoint; llama_like: swiglu (megatron's fc1 sharded-tensor factory), RMSNorm,
    rope, GQA, untied output, exit blocks."""
    from nemo_ee.checkpoint.dist import save_model
    from nemo_ee.models import build_model

    torch.manual_seed(5)
    model = build_model(cfg(**(LLAMA_LIKE if request.param == "llama_like" else {})))
    save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def _stage(c, pp=1):
    from nemo_ee.tuning.pipeline import build_tuning_stage, init_tuning_parallel, tuning_config

    tc = tuning_config(c, pp)
    init_tuning_parallel(tc)
    return build_tuning_stage(tc)


def test_dist_load_reads_only_up_to_the_last_exit_and_tuning_matches_eetuner(full_and_ckpt):
    from nemo_ee.parallel.schedules import split_microbatches
    from nemo_ee.tuning.ee_tune import EETuner
    from nemo_ee.tuning.pipeline import PipelineEETuner, gather_exit_state, load_stage_from_dist

    full, ckpt = full_and_ckpt
    stage = _stage(full.ee_config)
    names = load_stage_from_dist(stage, ckpt)
    assert {int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")} == {0, 1, 2, 3}
    assert not any("final_layernorm" in n or n.startswith("output_layer") for n in names)
    own = full.state_dict()
    for name, value in stage.state_dict().items():
        if torch.is_tensor(value):
            from nemo_ee.tuning.pipeline import source_name

            assert torch.equal(value, own[source_name(name, 0)]), name
    ref, tuner = EETuner(full, lr=1e-2), PipelineEETuner(stage, lr=1e-2)
    for step in range(4):
        b = batch(step)
        a = ref.step(b["tokens"], b["labels"], b["loss_mask"], b["position_ids"])
        got = tuner.step(split_microbatches(b, 1))  # 4 micro-batches of one sample
        assert got.keys() == a.keys() and all(got[i] == pytest.approx(a[i], rel=1e-5) for i in a)
    tuned = gather_exit_state(stage)
    # The two sides sum the 4 samples' gradients in another order; AdamW turns that rounding noise into parameter
    # differences where an element's gradient changes sign between steps (m small against sqrt(v)). Measured: up to
    # 1.3e-5 on the llama-like exit MLPs (the machine's CPU kernels decide), i.e. 3e-4 of the 4 x lr an element can
    # move. The bound is 1e-3 of that distance; a real difference (a missing micro-batch, a wrong loss weight) moves
    # elements by a good part of lr.
    bound = 1e-3 * 1e-2 * 4
    for key, value in tuned.items():
        assert float((value - own[key]).abs().max()) <= bound, key  # `own` holds the EETuner's (live) tensors


def test_dist_load_rejects_other_exits(full_and_ckpt):
    from nemo_ee.tuning.pipeline import load_stage_from_dist

    _, ckpt = full_and_ckpt
    stage = _stage(cfg(exit_layer_nums=[2, 3]))
    with pytest.raises(ValueError, match=r"exit_layer_nums=\[2, 4\] but the tuning model has \[2, 3\]"):
        load_stage_from_dist(stage, ckpt)
    with pytest.raises(FileNotFoundError, match="not a complete nemo_ee distributed checkpoint"):
        load_stage_from_dist(stage, ckpt.parent / "nothing")


def test_safetensors_load_and_errors(single_process, tmp_path):
    from safetensors.torch import save_file

    from nemo_ee.models import build_model
    from nemo_ee.tuning.pipeline import load_stage_from_safetensors

    torch.manual_seed(1)
    full = build_model(cfg())
    state = {f"model.{k}": v.contiguous() for k, v in full.state_dict().items() if torch.is_tensor(v)}
    save_file(state, tmp_path / "w.safetensors")
    stage = _stage(full.ee_config)
    read = load_stage_from_safetensors(stage, tmp_path / "w.safetensors", prefix="model.")
    assert not any(n.startswith(("model.decoder.layers.4.", "model.decoder.layers.5.", "model.decoder.final",
                                 "model.output_layer")) for n in read)
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in stage.state_dict().items() if torch.is_tensor(v))
    del state["model.decoder.layers.3.mlp.linear_fc2.bias"]
    save_file(state, tmp_path / "w2.safetensors")
    with pytest.raises(KeyError, match="model.decoder.layers.3.mlp.linear_fc2.bias is missing"):
        load_stage_from_safetensors(stage, tmp_path / "w2.safetensors", prefix="model.")


def test_world_of_one_cannot_run_two_stages(single_process):
    from nemo_ee.tuning.pipeline import init_tuning_parallel, tuning_config

    with pytest.raises(ValueError, match=r"the world size is 1 but pipeline_model_parallel_size=2 \(launch with "
                                         r"torchrun --nproc_per_node 2\)"):
        init_tuning_parallel(tuning_config(cfg(), 2))


def test_tied_exits_need_the_last_exit_on_the_last_stage():
    from nemo_ee.tuning.pipeline import tuning_config

    c = cfg(exit_layer_nums=[1, 3], exit_position="pre", tie_exit_output=True, exit_mlp=False)
    with pytest.raises(ValueError, match=r"the last stage must hold the last exit \(exit_position='pre' puts it on "
                                         r"stage 1\)"):
        tuning_config(c, 3)


def test_write_nemo_with_exits_replaces_only_the_exits(tmp_path):
    import tarfile

    from safetensors.torch import load, save_file

    from nemo_ee.tuning.nemo_pipeline import write_nemo_with_exits

    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "model_config.yaml").write_text("arch: {}\n")
    (folder / "tok.json").write_text("{}")
    state = {"model.decoder.w": torch.randn(3, 2), "model.exits.0.norm.weight": torch.zeros(2)}
    save_file(state, folder / "model_weights.safetensors")
    src = tmp_path / "src.nemo"
    with tarfile.open(src, "w:") as tar:
        tar.add(folder, arcname=".")
    dst = write_nemo_with_exits(src, tmp_path / "dst.nemo", {"exits.0.norm.weight": torch.ones(2)})
    with tarfile.open(src) as a, tarfile.open(dst) as b:
        assert [m.name for m in a.getmembers()] == [m.name for m in b.getmembers()]
        assert b.extractfile("./tok.json").read() == b"{}"
        out = load(b.extractfile("./model_weights.safetensors").read())
    assert torch.equal(out["model.decoder.w"], state["model.decoder.w"])
    assert torch.equal(out["model.exits.0.norm.weight"], torch.ones(2))
    with pytest.raises(KeyError, match=r"missing \['model.exits.0.norm.weight'\], unknown \['model.exits.1.x'\]"):
        write_nemo_with_exits(src, tmp_path / "bad.nemo", {"exits.1.x": torch.ones(2)})
    with pytest.raises(ValueError, match=r"exits.0.norm.weight: tuned \(3,\) torch.float32, source \(2,\)"):
        write_nemo_with_exits(src, tmp_path / "bad.nemo", {"exits.0.norm.weight": torch.ones(3)})
    assert not (tmp_path / "bad.nemo").exists()
