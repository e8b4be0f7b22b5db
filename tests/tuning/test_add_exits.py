"""EE-Tuning step 1: adding exits to a trained model (copy / random init) and the add_exits.py script."""
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from nemo_ee.data import CorpusSpec, train_tokenizer

    return str(train_tokenizer(CorpusSpec(max_files=5), 300, tmp_path_factory.mktemp("tok")))


def tiny(tokenizer_file, **arch):
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel, prepare_config

    cfg = OmegaConf.load(REPO / "conf" / "ee_gpt_tiny.yaml").model
    cfg.tokenizer.tokenizer_file = tokenizer_file
    cfg.tokenizer.vocab_size = 300
    cfg.arch.update(dict(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16,
                         exit_layer_nums=[], exit_loss_weights=1.0))
    cfg.arch.update(arch)
    return EarlyExitGPTNeMoModel(prepare_config(cfg))


def saved(tmp_path, tokenizer_file, name="in.nemo", **arch):
    """A tiny model saved to .nemo and restored from it (as the script sees it)."""
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    path = tmp_path / name
    tiny(tokenizer_file, **arch).save_to(str(path))
    return path, EarlyExitGPTNeMoModel.restore_from(str(path), map_location="cpu")


def backbone(model):
    return {k: v for k, v in model.model.state_dict().items() if not k.startswith("exits.") and torch.is_tensor(v)}


def tokens(model):
    return torch.tensor([model.tokenizer.encode(TEXT * 3)[:16]])


@pytest.mark.parametrize("tied", [True, False])
def test_copy_init_exit_after_last_layer_reproduces_final_logits(tmp_path, tokenizer_file, single_process, tied):
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel
    from nemo_ee.tuning import add_exits

    # The input already has an exit with per-exit lists: it is replaced, the lists reset.
    src_path, src = saved(tmp_path, tokenizer_file, share_embeddings_and_output_weights=tied,
                          exit_layer_nums=[3], exit_loss_weights=[0.5], exit_logit_temperature=[2.0])
    new = add_exits(src, [4, 2], exit_loss_weights=[0.7, 0.3])
    ee = new.ee_config
    assert ee.exit_layer_nums == [2, 4] and ee.per_exit("exit_loss_weights") == [0.3, 0.7]
    assert ee.tie_exit_output is False and ee.exit_logit_temperature == 1.0
    assert ee.share_embeddings_and_output_weights is tied
    final_w = src.model.shared_embedding_or_output_weight() if tied else src.model.output_layer.weight
    assert torch.equal(new.model.exits["1"].output_layer.weight, final_w)
    assert new.model.exits["1"].output_layer.weight.data_ptr() != final_w.data_ptr()

    out = tmp_path / "ee.nemo"
    new.save_to(str(out))
    restored = EarlyExitGPTNeMoModel.restore_from(str(out), map_location="cpu")
    input_bb = backbone(src)
    for m in (new, restored):
        bb = backbone(m)
        assert bb.keys() == input_bb.keys()
        assert all(torch.equal(bb[k], input_bb[k]) for k in bb)
        assert m.tokenizer.encode(TEXT) == src.tokenizer.encode(TEXT)
        assert m.tokenizer.fingerprint == src.tokenizer.fingerprint
        m.eval()
    src.eval()
    x = tokens(src)
    with torch.no_grad():
        base, a, b = src(x), new(x), restored(x)
    assert torch.equal(a.output, base.output) and torch.equal(b.output, base.output)
    assert torch.equal(a.exits[1], base.output), "copied exit after the last layer must equal the final logits"
    assert torch.equal(b.exits[1], base.output)
    assert torch.equal(a.exits[0], b.exits[0])
    assert restored.ee_config == ee


def test_copy_init_mlp_and_block_copy_their_source_layers(tmp_path, tokenizer_file, single_process):
    from nemo_ee.tuning import add_exits

    src = tiny(tokenizer_file)  # never had exits
    for position, layers, sources in (("pre", [1, 3], [1, 2]), ("post", [2, 4], [2, 4])):
        new = add_exits(src, layers, exit_position=position, exit_mlp=True, exit_block=True)
        last = src.model.decoder.layers[-1].state_dict()
        for key, source in zip(("0", "1"), sources):
            head = new.model.exits[key]
            layer = src.model.decoder.layers[source - 1]
            block = {k: v for k, v in head.block.state_dict().items() if torch.is_tensor(v)}
            assert block and all(torch.equal(v, last[k]) for k, v in block.items())
            for mine, theirs in ((head.mlp, layer.mlp), (head.mlp_norm, layer.pre_mlp_layernorm)):
                theirs = dict(theirs.named_parameters())
                assert all(torch.equal(p, theirs[n]) for n, p in mine.named_parameters())
            final_norm = dict(src.model.decoder.final_layernorm.named_parameters())
            assert all(torch.equal(p, final_norm[n]) for n, p in head.norm.named_parameters())
        assert all(torch.equal(v, backbone(src)[k]) for k, v in backbone(new).items())


def test_random_init_statistics(tmp_path, tokenizer_file, single_process):
    from nemo_ee.tuning import add_exits

    src = tiny(tokenizer_file, hidden_size=64, ffn_hidden_size=256)
    std, L = 0.02, 4
    new = add_exits(src, [2], exit_mlp=True, exit_block=True, init="random", init_std=std, seed=7)
    head = new.model.exits["0"]
    assert head.output_layer.weight.std().item() == pytest.approx(std, rel=0.1)
    scaled = std / math.sqrt(2 * L)
    for w in (head.mlp.linear_fc2.weight, head.block.mlp.linear_fc2.weight, head.block.self_attention.linear_proj.weight):
        assert w.std().item() == pytest.approx(scaled, rel=0.1)
        assert abs(w.mean().item()) < scaled / 5
    for w in (head.mlp.linear_fc1.weight, head.block.self_attention.linear_qkv.weight):
        assert w.std().item() == pytest.approx(std, rel=0.1)
    for name, p in head.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.dim() == 1:
            assert torch.all(p == 1), name
    again = add_exits(src, [2], exit_mlp=True, exit_block=True, init="random", init_std=std, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), again.model.exits["0"].parameters()))
    assert all(torch.equal(v, backbone(src)[k]) for k, v in backbone(new).items())


def test_add_exits_refuses_bad_arguments(tokenizer_file, single_process):
    from nemo_ee.tuning import add_exits, exit_layers_from_fractions

    src = tiny(tokenizer_file)
    with pytest.raises(ValueError, match="outside 1..4"):
        add_exits(src, [5])
    with pytest.raises(ValueError, match="init="):
        add_exits(src, [2], init="zeros")
    with pytest.raises(ValueError, match="2 exit loss weights for 1 exits"):
        add_exits(src, [2], exit_loss_weights=[1.0, 2.0])
    assert exit_layers_from_fractions([0.25, 0.5, 1.0], 8) == [2, 4, 8]
    assert exit_layers_from_fractions([0.3125], 8) == [3]  # 2.5 rounds up
    with pytest.raises(ValueError, match="outside 1..8"):
        exit_layers_from_fractions([0.01], 8)
    with pytest.raises(ValueError, match="repeats"):
        exit_layers_from_fractions([0.25, 0.26], 8)


# ---------------------------------------------------------------------- the script
def test_script_help():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "add_exits.py"), "--help"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    for flag in ("--exit-layers", "--exit-fractions", "--no-exit-norm", "--exit-mlp", "--exit-block",
                 "--exit-position", "--exit-loss-weights", "--random-init", "--init-std", "--overwrite"):
        assert flag in proc.stdout


def test_script_fractions_and_end_to_end(tmp_path, tokenizer_file, single_process):
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel
    from nemo_ee.tuning.add_exits import main, parse_args

    src_path, src = saved(tmp_path, tokenizer_file, num_layers=8)
    out = tmp_path / "out" / "ee.nemo"
    args = parse_args(["--in", str(src_path), "--out", str(out), "--exit-fractions", "0.25", "0.5"])
    assert args.layers == [2, 4]
    main(["--in", str(src_path), "--out", str(out), "--exit-fractions", "0.25", "0.5", "--exit-mlp",
          "--no-exit-norm", "--exit-loss-weights", "0.2", "0.4"])
    new = EarlyExitGPTNeMoModel.restore_from(str(out), map_location="cpu")
    ee = new.ee_config
    assert ee.exit_layer_nums == [2, 4] and ee.exit_mlp and not ee.exit_norm and ee.per_exit("exit_loss_weights") == [0.2, 0.4]
    assert all(torch.equal(v, backbone(src)[k]) for k, v in backbone(new).items())
    assert new.tokenizer.encode(TEXT) == src.tokenizer.encode(TEXT)
    assert not list(out.parent.glob(".*tmp*")), "temporary file left behind"
    with pytest.raises(SystemExit) as err:  # existing --out
        parse_args(["--in", str(src_path), "--out", str(out), "--exit-layers", "2"])
    assert err.value.code == 2
    main(["--in", str(src_path), "--out", str(out), "--exit-layers", "8", "--overwrite"])
    assert EarlyExitGPTNeMoModel.restore_from(str(out), map_location="cpu").ee_config.exit_layer_nums == [8]


@pytest.fixture
def fake_nemo(tmp_path):
    """A .nemo archive holding only a model config (all that argument checking reads)."""
    path = tmp_path / "m.nemo"
    cfg = tmp_path / "model_config.yaml"
    cfg.write_text("arch:\n  num_layers: 8\ntokenizer:\n  vocab_size: 300\n")
    with tarfile.open(path, "w:") as tar:
        tar.add(cfg, arcname="./model_config.yaml")
    return path


@pytest.mark.parametrize("argv, message", [
    (["--in", "{tmp}/missing.nemo", "--out", "{tmp}/o.nemo", "--exit-layers", "2"], "no such file"),
    (["--in", "{tmp}/model_config.yaml", "--out", "{tmp}/o.nemo", "--exit-layers", "2"], "not a .nemo file"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/m.nemo", "--exit-layers", "2"], "--out must differ from --in"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/model_config.yaml", "--exit-layers", "2"], "must end in .nemo"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/o.nemo", "--exit-layers", "9"], "outside 1..8"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/o.nemo", "--exit-layers", "0"], "outside 1..8"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/o.nemo", "--exit-layers", "2", "2"], "repeats layer"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/o.nemo", "--exit-fractions", "0.01"], "outside 1..8"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/o.nemo", "--exit-fractions", "0.25", "0.3"], "repeats"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/o.nemo", "--exit-layers", "2", "4", "--exit-loss-weights", "1", "2", "3"],
     "3 weights for 2 exits"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/o.nemo", "--exit-layers", "2", "--init-std", "0"], "must be > 0"),
    (["--in", "{tmp}/m.nemo", "--out", "{tmp}/o.nemo"], "one of the arguments --exit-layers --exit-fractions is required"),
    (["--in", "{tmp}/bad.nemo", "--out", "{tmp}/o.nemo", "--exit-layers", "2"], "not a readable .nemo"),
])
def test_script_bad_input_exits_2_with_message(tmp_path, fake_nemo, capsys, argv, message):
    from nemo_ee.tuning.add_exits import parse_args

    (tmp_path / "bad.nemo").write_text("not a tar archive")
    with pytest.raises(SystemExit) as err:
        parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_script_refuses_existing_out_and_parallel_layout(tmp_path, fake_nemo, capsys):
    from nemo_ee.tuning.add_exits import parse_args

    (tmp_path / "o.nemo").write_text("x")
    with pytest.raises(SystemExit) as err:
        parse_args(["--in", str(fake_nemo), "--out", str(tmp_path / "o.nemo"), "--exit-layers", "2"])
    assert err.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    cfg = tmp_path / "model_config.yaml"
    cfg.write_text("arch:\n  num_layers: 8\n  tensor_model_parallel_size: 2\n")
    tp = tmp_path / "tp.nemo"
    with tarfile.open(tp, "w:") as tar:
        tar.add(cfg, arcname="model_config.yaml")
    with pytest.raises(SystemExit) as err:
        parse_args(["--in", str(tp), "--out", str(tmp_path / "o2.nemo"), "--exit-layers", "2"])
    assert err.value.code == 2 and "TP=PP=1" in capsys.readouterr().err
