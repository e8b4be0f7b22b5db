"""EE-Tuning data (data_sources / tuning_dataset), the least-squares exit init settings and fit
(nemo_ee.tuning.ee_tune.lstsq_settings, nemo_ee.tuning.lstsq_init.fit_exit_output_layers)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import ConcatDataset

import nemo_ee.models.nemo_model  # noqa: F401  (tuning_dataset's heavy import, paid at collection)
from nemo_ee.data import TokenWindowDataset
from nemo_ee.tuning.data import data_sources, tuning_dataset
from nemo_ee.tuning.ee_tune import lstsq_settings
from tests.tuning.test_ee_tune import _cfg, backbone_state, exits_nemo  # noqa: F401  (module fixture)
from tests.tuning.test_ee_tune_kl import build, cfg, positions, tokens_of

V = 64
CORPUS_A = "def add(a, b):\n    return a + b\n\n\nclass Box:\n    def area(self):\n        return self.w * self.h\n" * 6
CORPUS_B = "import os\n\nprint(os.getcwd())\nfor i in range(10):\n    print(i, i * i)\n" * 6


def _tune_cfg(**data):
    return OmegaConf.create({"data": data})


def _npy(path, array):
    np.save(path, array)
    return path


# ---------------------------------------------------------------------- data_sources
def test_data_sources(tmp_path):
    f1, f2 = _npy(tmp_path / "a.npy", np.arange(10)), _npy(tmp_path / "b.npy", np.arange(10))
    assert data_sources(OmegaConf.create({})) == (True, [])
    assert data_sources(OmegaConf.create({"data": None})) == (True, [])
    assert data_sources(_tune_cfg(corpus=True, token_files=None)) == (True, [])
    assert data_sources(_tune_cfg(corpus=False, token_files=str(f1))) == (False, [f1])  # a string: one file
    assert data_sources(_tune_cfg(token_files=[str(f1), str(f2)])) == (True, [f1, f2])


@pytest.mark.parametrize("corpus", ["yes", 1, 0, "true", 1.0])
def test_data_sources_corpus_must_be_bool(corpus):
    with pytest.raises(ValueError) as err:
        data_sources(_tune_cfg(corpus=corpus))
    assert str(err.value) == f"data.corpus={corpus!r} must be true or false"


def test_data_sources_token_file_errors(tmp_path):
    (tmp_path / "tokens.txt").write_text("1 2 3")
    (tmp_path / "dir.npy").mkdir()
    good = _npy(tmp_path / "good.npy", np.arange(10))
    for bad in (tmp_path / "missing.npy", tmp_path / "tokens.txt", tmp_path / "dir.npy", tmp_path / "good"):
        with pytest.raises(FileNotFoundError) as err:
            data_sources(_tune_cfg(token_files=[str(good), str(bad)]))
        assert str(err.value) == f"data.token_files: {bad} is not an .npy file"


@pytest.mark.parametrize("files", [None, [], ""])
def test_data_sources_nothing_to_tune_on(files):
    with pytest.raises(ValueError) as err:
        data_sources(_tune_cfg(corpus=False, token_files=files))
    assert str(err.value) == "data.corpus=false and no data.token_files: nothing to tune on"


# ---------------------------------------------------------------------- tuning_dataset
def test_tuning_dataset_token_file_windows(tmp_path):
    stream = (np.arange(53) * 7 % V).astype(np.int32)
    path = _npy(tmp_path / "answers.npy", stream)
    ds = tuning_dataset(_tune_cfg(corpus=False, token_files=[str(path)]), None, None, seq_length=8, vocab_size=V)
    assert isinstance(ds, TokenWindowDataset) and len(ds) == (53 - 1) // 8 == 6
    for i in range(len(ds)):
        item = ds[i]
        assert item["tokens"].tolist() == stream[i * 8:i * 8 + 8].tolist()
        assert item["labels"].tolist() == stream[i * 8 + 1:i * 8 + 9].tolist()
        assert item["tokens"].dtype == torch.int64
        assert item["position_ids"].tolist() == list(range(8)) and item["loss_mask"].tolist() == [1.0] * 8
    # two files: concatenated in the order given
    other = _npy(tmp_path / "other.npy", np.full(20, V - 1, dtype=np.uint16))
    both = tuning_dataset(_tune_cfg(corpus=False, token_files=[str(path), str(other)]), None, None, 8, V)
    assert isinstance(both, ConcatDataset) and len(both) == 6 + 2
    assert both[5]["tokens"].tolist() == stream[40:48].tolist()
    assert both[6]["tokens"].tolist() == [V - 1] * 8


def test_tuning_dataset_bad_token_files(tmp_path):
    high = _npy(tmp_path / "high.npy", np.array([0, 5, V, 3] * 5))
    with pytest.raises(ValueError) as err:
        tuning_dataset(_tune_cfg(corpus=False, token_files=[str(high)]), None, None, 4, V)
    assert str(err.value) == (f"data.token_files: {high} has token id {V}, outside the model's vocabulary 0..{V - 1}")
    flat = _npy(tmp_path / "flat.npy", np.zeros((2, 10), dtype=np.int64))
    with pytest.raises(ValueError) as err:
        tuning_dataset(_tune_cfg(corpus=False, token_files=[str(flat)]), None, None, 4, V)
    assert str(err.value) == f"data.token_files: {flat} must hold a 1-D integer array, got int64 [2, 10]"
    floats = _npy(tmp_path / "floats.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match=r"must hold a 1-D integer array, got float32 \[10\]$"):
        tuning_dataset(_tune_cfg(corpus=False, token_files=[str(floats)]), None, None, 4, V)
    short = _npy(tmp_path / "short.npy", np.arange(4))
    with pytest.raises(ValueError, match="4 tokens are too few for one window of seq_length 4"):
        tuning_dataset(_tune_cfg(corpus=False, token_files=[str(short)]), None, None, 4, V)


def test_tuning_dataset_corpus_and_token_file(tmp_path):
    from nemo_ee.data import CorpusSpec, EETokenizer, build_datasets, train_tokenizer

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.py").write_text(CORPUS_A)
    (root / "b.py").write_text(CORPUS_B)
    spec = CorpusSpec(root=str(root), val_fraction=0.5)
    tok = EETokenizer.from_file(train_tokenizer(spec, 300, tmp_path / "tok"))
    model_cfg = OmegaConf.create({"data": {"corpus_root": str(root), "val_fraction": 0.5, "max_files": None},
                                  "tokenizer": {"cache_dir": str(tmp_path / "cache")}})
    stream = np.arange(41) % tok.vocab_size
    path = _npy(tmp_path / "extra.npy", stream)
    ref = build_datasets(spec, tok, 8, tmp_path / "ref_cache")[0]
    assert len(ref) > 3
    only_corpus = tuning_dataset(_tune_cfg(corpus=True, max_files=None), model_cfg, tok, 8, tok.vocab_size)
    assert isinstance(only_corpus, TokenWindowDataset) and np.array_equal(only_corpus.tokens, ref.tokens)
    ds = tuning_dataset(_tune_cfg(corpus=True, token_files=[str(path)], max_files=None), model_cfg, tok, 8,
                        tok.vocab_size)
    assert isinstance(ds, ConcatDataset) and len(ds) == len(ref) + 5
    assert np.array_equal(ds.datasets[0].tokens, ref.tokens)
    assert ds[0]["tokens"].tolist() == ref[0]["tokens"].tolist()
    assert ds[len(ref)]["tokens"].tolist() == stream[:8].tolist()
    assert ds[len(ds) - 1]["labels"].tolist() == stream[33:41].tolist()
    # the tuning data section overrides the model's own (here: a corpus of one other root's files)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.py").write_text(CORPUS_B * 2)
    (other / "b.py").write_text(CORPUS_A * 2)
    moved = tuning_dataset(_tune_cfg(corpus=True, corpus_root=str(other)), model_cfg, tok, 8, tok.vocab_size)
    assert np.array_equal(moved.tokens, build_datasets(CorpusSpec(root=str(other), val_fraction=0.5), tok, 8,
                                                       tmp_path / "ref_cache")[0].tokens)
    assert not np.array_equal(moved.tokens, ref.tokens)


# ---------------------------------------------------------------------- lstsq_settings
def test_lstsq_settings():
    assert lstsq_settings(OmegaConf.create({})) == (0, 0.01)
    assert lstsq_settings({"lstsq_init_windows": 4, "lstsq_ridge": 0}) == (4, 0.0)
    windows, ridge = lstsq_settings({"lstsq_init_windows": np.int64(3), "lstsq_ridge": 2})
    assert (windows, ridge) == (3, 2.0) and type(windows) is int and type(ridge) is float
    # off at PP > 1 is fine
    assert lstsq_settings({"lstsq_init_windows": 0, "pipeline_model_parallel_size": 2}) == (0, 0.01)


@pytest.mark.parametrize("windows", [-1, True, False, 2.0, "2", None])
def test_lstsq_settings_bad_windows(windows):
    with pytest.raises(ValueError) as err:
        lstsq_settings({"lstsq_init_windows": windows})
    assert str(err.value) == f"lstsq_init_windows={windows!r} must be an integer >= 0 (0: copy init only)"


@pytest.mark.parametrize("ridge", [float("nan"), float("inf"), -0.1, -1, True, "0.1", None])
def test_lstsq_settings_bad_ridge(ridge):
    with pytest.raises(ValueError) as err:
        lstsq_settings({"lstsq_init_windows": 1, "lstsq_ridge": ridge})
    assert str(err.value) == f"lstsq_ridge={ridge!r} must be a finite number >= 0"


def test_lstsq_settings_needs_pp1():
    with pytest.raises(ValueError) as err:
        lstsq_settings({"lstsq_init_windows": 2, "pipeline_model_parallel_size": 2})
    assert str(err.value) == ("lstsq_init_windows=2 needs pipeline_model_parallel_size=1 (the fit reads the final "
                              "output layer's input)")


# ---------------------------------------------------------------------- fit_exit_output_layers
def _batches(seeds, batch=4):
    for s in seeds:
        t = tokens_of(s, batch)
        yield {"tokens": t, "position_ids": positions(t)}


def _logits(model, tokens):
    with torch.no_grad():
        out = model(tokens, positions(tokens), None)
    return out.output.double(), {i: e.double() for i, e in out.exits.items()}


def _inputs_of_output_layers(model, tokens):
    """(final output layer's input, {exit: its output layer's input}) as [n, h] doubles, by forward hooks."""
    got = {}
    hooks = [model.output_layer.register_forward_hook(lambda m, i, o: got.__setitem__("final", i[0]))]
    for k, head in model.exits.items():
        hooks.append(head.output_layer.register_forward_hook(lambda m, i, o, k=int(k): got.__setitem__(k, i[0])))
    with torch.no_grad():
        model(tokens, positions(tokens), None)
    for h in hooks:
        h.remove()
    flat = {k: v.reshape(-1, v.shape[-1]).double() for k, v in got.items()}
    return flat.pop("final"), flat


TIED_FINAL = dict(share_embeddings_and_output_weights=True)


@pytest.mark.parametrize("arch", [TIED_FINAL, dict(TIED_FINAL, exit_mlp=True),
                                  pytest.param(dict(exit_mlp=True), id="untied-final")])
def test_fit_moves_exit_logits_towards_final(single_process, arch):
    from nemo_ee.tuning.lstsq_init import fit_exit_output_layers

    model = build(cfg(**arch))
    model.train()
    tokens = torch.cat([tokens_of(s, 4) for s in (0, 1)])
    final, before = _logits(model, tokens)
    y, xs = _inputs_of_output_layers(model, tokens)
    scale = y.pow(2).mean()
    backbone = backbone_state(model)
    exit_other = {k: v.clone() for k, v in model.state_dict().items()
                  if k.startswith("exits.") and "output_layer" not in k and torch.is_tensor(v)}
    out_before = {k: head.output_layer.weight.detach().clone() for k, head in model.exits.items()}
    stats = fit_exit_output_layers(model, _batches((0, 1)), ridge=1e-2)
    assert model.training  # the mode is restored
    assert sorted(stats) == [0, 1]
    for i, st in stats.items():
        assert set(st) == {"residual", "identity_residual", "tokens"}
        assert st["tokens"] == 2 * 4 * 12
        assert st["identity_residual"] == pytest.approx(float((xs[i] - y).pow(2).mean() / scale), rel=1e-9)
        assert 0 <= st["residual"] < st["identity_residual"]
        assert not torch.equal(model.exits[str(i)].output_layer.weight, out_before[str(i)])
    _, after = _logits(model, tokens)
    for i in (0, 1):
        mse_before = float((before[i] - final).pow(2).mean())
        mse_after = float((after[i] - final).pow(2).mean())
        assert mse_after < 0.9 * mse_before, (i, mse_before, mse_after)
    # the backbone and everything of the exits but their output weights are bit-identical
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in backbone.items())
    assert all(torch.equal(now[k], v) for k, v in exit_other.items())


@pytest.mark.parametrize("share", [True, pytest.param(False, id="untied-final")])
def test_fit_without_ridge_is_ordinary_least_squares(single_process, share):
    """ridge=0: W_e = W_final @ A with A the least-squares map of torch.linalg.lstsq, residual its relative error.
    (RMSNorm: a LayerNorm's output is centred, so its x^T x is singular and A is not unique.)"""
    from nemo_ee.tuning.lstsq_init import fit_exit_output_layers

    model = build(cfg(exit_mlp=True, normalization="RMSNorm", share_embeddings_and_output_weights=share))
    model.eval()
    tokens = torch.cat([tokens_of(s, 4) for s in (3, 4, 5)])
    y, xs = _inputs_of_output_layers(model, tokens)
    w = (model.output_layer.weight if not share else model.embedding.word_embeddings.weight).detach().double()
    stats = fit_exit_output_layers(model, iter([{"tokens": tokens, "position_ids": positions(tokens)}]), ridge=0)
    assert not model.training
    for i, x in xs.items():
        a_t = torch.linalg.lstsq(x, y).solution
        expected = (w @ a_t.T).float()
        torch.testing.assert_close(model.exits[str(i)].output_layer.weight.detach(), expected, rtol=1e-5, atol=1e-6)
        assert stats[i]["residual"] == pytest.approx(float((x @ a_t - y).pow(2).mean() / y.pow(2).mean()),
                                                     rel=1e-6, abs=1e-9)
        assert stats[i]["tokens"] == 3 * 4 * 12


def test_fit_errors(single_process):
    from nemo_ee.tuning.ee_tune import build_truncated_model
    from nemo_ee.tuning.lstsq_init import fit_exit_output_layers

    tied = build(cfg(share_embeddings_and_output_weights=True, tie_exit_output=True))
    before = {k: v.clone() for k, v in tied.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError) as err:
        fit_exit_output_layers(tied, _batches((0,)))
    assert str(err.value) == ("the least-squares exit init sets the exits' own output weights; tied exits "
                              "(tie_exit_output=True) have none")
    assert all(torch.equal(tied.state_dict()[k], v) for k, v in before.items())
    model = build(cfg())
    for ridge in (-1e-3, True, "0.1"):
        with pytest.raises(ValueError) as err:
            fit_exit_output_layers(model, _batches((0,)), ridge=ridge)
        assert str(err.value) == f"ridge={ridge!r} must be a number >= 0"
    with pytest.raises(ValueError) as err:
        fit_exit_output_layers(model, iter([]))
    assert str(err.value) == "no batches: the least-squares exit init needs some tokens"
    truncated = build_truncated_model(cfg(share_embeddings_and_output_weights=True))
    with pytest.raises(ValueError, match="needs the final output layer"):
        fit_exit_output_layers(truncated, _batches((0,)))


# ---------------------------------------------------------------------- tune_nemo with the fit
def test_tune_nemo_with_lstsq_init(single_process, exits_nemo, tmp_path, capsys):
    from nemo_ee.tuning.ee_tune import tune_nemo

    out = tmp_path / "tuned.nemo"
    result = tune_nemo(_cfg(exits_nemo, out, max_steps=1, micro_batch_size=2, seq_length=8, lstsq_init_windows=2))
    text = capsys.readouterr().out
    assert sorted(result["lstsq_init"]) == [1, 2]  # by exit layer
    for layer, st in result["lstsq_init"].items():
        assert st["tokens"] == 2 * 8  # two windows of seq_length 8
        assert math.isfinite(st["residual"]) and st["residual"] < st["identity_residual"]
        line = (f"least-squares init, exit at layer {layer}: relative residual {st['residual']:.4f} "
                f"(copy init {st['identity_residual']:.4f}) over 16 tokens")
        assert line in text
    assert len(re.findall(r"^least-squares init, exit at layer \d+:", text, flags=re.M)) == 2
    assert out.is_file() and result["steps"] == 1
    # off by default: no fit, no line
    result = tune_nemo(_cfg(exits_nemo, tmp_path / "plain.nemo", max_steps=1, micro_batch_size=2, seq_length=8))
    assert result["lstsq_init"] == {} and "least-squares init" not in capsys.readouterr().out


def test_tune_nemo_bad_lstsq_settings_fail_before_any_work(single_process, exits_nemo, tmp_path):
    from nemo_ee.tuning.ee_tune import tune_nemo

    out = tmp_path / "tuned.nemo"
    with pytest.raises(ValueError, match=r"lstsq_ridge=-1\.0 must be a finite number >= 0"):
        tune_nemo(_cfg(exits_nemo, out, max_steps=1, lstsq_init_windows=2, lstsq_ridge=-1.0))
    assert not out.exists()
