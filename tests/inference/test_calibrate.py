"""Threshold calibration: loosest-threshold choice, verification by real early-exit decoding, .nemo round trip."""
import tarfile

import pytest
import torch

from nemo_ee.inference.calibrate import (
    calibrate, check_calibration_args, choose_thresholds, collect_statistics, positional_agreement, token_targets,
)
from nemo_ee.inference.generate import GenerationParams, generate
from tests.inference.conftest import V, bigram_batch, train_model

TARGET = 0.9


def word(i: int) -> str:
    return ("<|endoftext|>", "<|pad|>")[i] if i < 2 else f"t{i}"


def write_tiny_nemo(model, path):
    """The conftest model as a .nemo with a word-level tokenizer: token i is the word ``t<i>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from nemo_ee.checkpoint.nemo_file import write_nemo

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(V)}, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_file = path.parent / "tokenizer.json"
    tok.save(str(tok_file))
    state = {k: v for k, v in model.state_dict().items() if v is not None and not k.endswith("_extra_state")}
    ee = model.ee_config
    return write_nemo(ee.to_dict(), state, tok_file, path, exit_fields={"exit_layer_nums": list(ee.exit_layer_nums)})


@pytest.fixture(scope="module")
def model(world):
    return train_model()


@pytest.fixture(scope="module")
def calib_prompts(model):
    g = torch.Generator().manual_seed(7)
    return bigram_batch(g, 12, 6, model.bigram_table).tolist()


@pytest.fixture(scope="module")
def nemo_path(model, tmp_path_factory):
    return write_tiny_nemo(model, tmp_path_factory.mktemp("calib") / "tiny.nemo")


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    for target in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"target {target} is outside \(0, 1\]"):
            check_calibration_args(target, "max_prob")
    with pytest.raises(ValueError, match="target 'high' is not a number"):
        check_calibration_args("high", "max_prob")
    with pytest.raises(ValueError, match=r"exit policy 'fast' is not one of \['max_prob', 'entropy', 'top2_margin'\]"):
        check_calibration_args(0.9, "fast")
    from nemo_ee.inference.cli import calibrate_main

    # argument errors come before the .nemo is even looked at
    assert calibrate_main(["--nemo", str(tmp_path / "none.nemo"), "--out", str(tmp_path / "o.nemo"), "--target", "1.5"]) == 2
    assert "error: target 1.5 is outside (0, 1]" in capsys.readouterr().err
    assert calibrate_main(["--nemo", str(tmp_path / "none.nemo"), "--in-place", "--policy", "fast"]) == 2
    assert "error: exit policy 'fast' is not one of" in capsys.readouterr().err
    assert calibrate_main(["--nemo", str(tmp_path / "none.nemo"), "--in-place"]) == 2
    assert f"error: no .nemo file at {tmp_path / 'none.nemo'}" in capsys.readouterr().err
    assert token_targets(0.98, 2) == pytest.approx([0.98, 0.99, 0.995, 1.0])


def _group_agreement(stats, agree, policy, threshold):
    fires = stats <= threshold if policy == "entropy" else stats >= threshold
    return fires, (agree[fires].double().mean().item() if fires.any() else float("nan"))


@pytest.mark.parametrize("policy", ["max_prob", "entropy", "top2_margin"])
def test_chosen_threshold_is_the_loosest_meeting_the_target(model, calib_prompts, policy):
    data = collect_statistics(model, calib_prompts, policy, max_tokens=16, progress=False)
    assert data.n_tokens == 12 * 16 and data.layers == [1, 2, 3]
    chosen = choose_thresholds(data, TARGET)
    remaining = torch.ones(data.n_tokens, dtype=torch.bool)
    enabled = 0
    for e, layer in enumerate(data.layers):
        stats, agree = data.stats[e][remaining], data.agree[e][remaining]
        t = chosen[layer]["threshold"]
        if t is None:  # disabled: even the most confident group misses the target
            best = stats.min() if policy == "entropy" else stats.max()
            assert _group_agreement(stats, agree, policy, float(best))[1] < TARGET
            continue
        enabled += 1
        fires, agreement = _group_agreement(stats, agree, policy, t)
        assert agreement >= TARGET and int(fires.sum()) == chosen[layer]["exited"]
        looser = stats[~fires]
        if len(looser):  # let in the next (less confident) group of positions: the target is missed
            nxt = float(looser.min() if policy == "entropy" else looser.max())
            assert _group_agreement(stats, agree, policy, nxt)[1] < TARGET, (layer, t, nxt)
        remaining &= ~(data.stats[e] <= t if policy == "entropy" else data.stats[e] >= t)
    assert enabled >= 1, chosen
    assert 0 < int(remaining.sum()) < data.n_tokens  # some positions exit early, some go to full depth


def test_calibration_is_verified_by_early_exit_decoding(model, calib_prompts):
    result = calibrate(model, calib_prompts, target=TARGET, max_tokens=16, progress=False)
    assert result.met and result.measured_agreement >= TARGET
    assert result.thresholds and set(result.thresholds) <= {1, 2, 3}
    full = generate(model, calib_prompts, GenerationParams(max_tokens=16, decode_mode="full"))
    early = generate(model, calib_prompts, GenerationParams(max_tokens=16, exit_thresholds=result.thresholds))
    measured = positional_agreement([g.token_ids for g in early], [g.token_ids for g in full])
    assert measured == pytest.approx(result.measured_agreement)
    depth = sum(sum(g.exit_layers) for g in early) / sum(len(g.exit_layers) for g in early)
    assert depth == pytest.approx(result.mean_exit_depth) and depth < model.ee_config.num_layers
    # on this model the per-token target TARGET alone misses end to end (one divergence shifts the rest of
    # a sequence), so calibration tightened it until the decoded agreement reached TARGET
    first = {k: v["threshold"] for k, v in choose_thresholds(
        collect_statistics(model, calib_prompts, "max_prob", 16, progress=False), TARGET).items() if v["threshold"]}
    loose = generate(model, calib_prompts, GenerationParams(max_tokens=16, exit_thresholds=first))
    assert positional_agreement([g.token_ids for g in loose], [g.token_ids for g in full]) < TARGET
    assert result.token_target > TARGET and result.rounds >= 2
    # a target of 1.0 keeps only zero-error thresholds: early-exit output is the full output on these prompts
    exact = calibrate(model, calib_prompts, target=1.0, max_tokens=16, progress=False)
    assert exact.measured_agreement == 1.0 and exact.token_target == 1.0


def test_thresholds_round_trip_into_the_nemo_and_become_generate_defaults(nemo_path, calib_prompts, tmp_path, capsys):
    import json

    from omegaconf import OmegaConf

    from nemo_ee.inference.cli import calibrate_main, request_params
    from nemo_ee.inference.loading import inference_defaults, load_nemo_for_inference

    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps([" ".join(word(i) for i in p) for p in calib_prompts]))
    out = tmp_path / "calibrated.nemo"
    argv = ["--nemo", str(nemo_path), "--out", str(out), "--prompts-file", str(prompts_file), "--target", str(TARGET),
            "--max-tokens", "16", "--no-progress"]
    assert calibrate_main(argv) == 0
    printed = capsys.readouterr().out
    assert "verified early-exit decoding: agreement=" in printed and f"wrote {out}" in printed
    assert calibrate_main(argv) == 2 and "exists; add --overwrite" in capsys.readouterr().err

    nemo = load_nemo_for_inference(out)
    section = nemo.cfg.inference
    assert section.calibration.target == TARGET and section.calibration.policy == "max_prob"
    assert section.calibration.n_prompts == 12 and section.calibration.n_tokens == 12 * 16
    assert section.calibration.measured_agreement >= TARGET
    expected = calibrate(nemo.model, calib_prompts, target=TARGET, max_tokens=16, progress=False)
    assert inference_defaults(nemo.cfg) == {"exit_policy": "max_prob", "exit_thresholds": expected.thresholds}
    params = request_params(OmegaConf.create({"max_tokens": 16}), inference_defaults(nemo.cfg), ())
    assert params.exit_thresholds == expected.thresholds and params.threshold is None
    with tarfile.open(nemo_path) as a, tarfile.open(out) as b:  # weights and tokenizer copied byte for byte
        for member in a.getmembers():
            if member.isfile() and not member.name.endswith("model_config.yaml"):
                assert a.extractfile(member).read() == b.extractfile(member.name).read(), member.name

    in_place = tmp_path / "in_place.nemo"
    in_place.write_bytes(nemo_path.read_bytes())
    assert calibrate_main(["--nemo", str(in_place), "--in-place", "--prompts-file", str(prompts_file),
                           "--policy", "entropy", "--target", "0.95", "--max-tokens", "8", "--no-progress"]) == 0
    cfg = load_nemo_for_inference(in_place).cfg
    assert cfg.inference.exit_policy == "entropy" and cfg.inference.calibration.target == 0.95
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_validation_prompts_come_from_the_corpus_validation_split(nemo_path, model, tmp_path, monkeypatch):
    from nemo_ee.data import CorpusSpec, split_files
    from nemo_ee.inference.cli import validation_prompts
    from nemo_ee.inference.loading import load_nemo_for_inference

    monkeypatch.setenv("NEMO_EE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(3)
    for f, seq in enumerate(bigram_batch(g, 5, 120, model.bigram_table).tolist()):
        (corpus / f"m{f}.py").write_text(" ".join(word(max(i, 2)) for i in seq))
    nemo = load_nemo_for_inference(nemo_path)
    prompts = validation_prompts(nemo, 4, 10, corpus_root=str(corpus))
    _, val = split_files(CorpusSpec(root=str(corpus)))
    val_ids = [i for path in val for i in nemo.tokenizer.encode(path.read_text()) + [nemo.tokenizer.eos_id]]
    assert len(prompts) == 4 and all(len(p) == 10 for p in prompts)
    assert prompts[0] == val_ids[:10] and prompts[-1] == val_ids[-10:]
    with pytest.raises(ValueError, match="num_prompts=0 and prompt_tokens=10 must be >= 1"):
        validation_prompts(nemo, 0, 10, corpus_root=str(corpus))


def test_calibration_with_an_exit_vocabulary(model, calib_prompts):
    from nemo_ee.inference.calibrate import frequent_tokens
    from nemo_ee.inference.loading import inference_defaults
    from omegaconf import OmegaConf

    assert frequent_tokens([[5, 5, 7], [7, 7, 9, 3]], 2) == (5, 7) and frequent_tokens([[2, 1]], 9) == (1, 2)
    data = collect_statistics(model, calib_prompts, "max_prob", max_tokens=16, progress=False, exit_vocab_size=20)
    full = [t for p, f in zip(calib_prompts, data.full_tokens) for t in list(p) + list(f)]
    assert data.exit_vocab == frequent_tokens([list(p) for p in calib_prompts] + data.full_tokens, 20)
    assert len(data.exit_vocab) == 20 and set(data.exit_vocab) <= set(full)
    # an exit's token is the best of the vocabulary's ids: it cannot agree where the full token is not one of them,
    # and it agrees wherever the exit's best token over the whole vocabulary agreed and is one of them
    whole = collect_statistics(model, calib_prompts, "max_prob", max_tokens=16, progress=False)
    inside = torch.tensor([t in data.exit_vocab for f in data.full_tokens for t in f])
    assert not bool(data.agree[:, ~inside].any()) and bool(data.agree[:, inside].any())
    assert bool((data.agree | ~(whole.agree & inside)).all())
    result = calibrate(model, calib_prompts, target=TARGET, max_tokens=16, progress=False, exit_vocab_size=20)
    assert result.met and result.exit_vocab == data.exit_vocab
    section = result.inference_section()
    assert section["exit_vocab"] == list(data.exit_vocab)
    defaults = inference_defaults(OmegaConf.create({"inference": section}))
    early = generate(model, calib_prompts, GenerationParams(max_tokens=16, **defaults))
    measured = positional_agreement([g.token_ids for g in early], data.full_tokens)
    assert measured == pytest.approx(result.measured_agreement)
    assert all(t in data.exit_vocab for g in early for t, d in zip(g.token_ids, g.exit_layers) if d < 4)
    with pytest.raises(ValueError, match=r"exit_vocab_size=0 must be an integer >= 1 \(or None: every token\)"):
        collect_statistics(model, calib_prompts[:1], max_tokens=2, progress=False, exit_vocab_size=0)
    from nemo_ee.inference.loading import CheckpointError

    with pytest.raises(CheckpointError, match=r"inference.exit_vocab must be distinct token ids >= 0 \(3 given\)"):
        inference_defaults(OmegaConf.create({"inference": {"exit_vocab": [1, 1, 2]}}))


def test_calibration_chooses_self_speculative_settings(model, calib_prompts):
    from nemo_ee.inference.loading import CheckpointError, inference_defaults
    from omegaconf import OmegaConf

    result = calibrate(model, calib_prompts, target=TARGET, max_tokens=16, progress=False, choose_draft=True)
    draft = result.draft
    assert draft["draft_exit"] in (1, 2, 3) and 1 <= draft["num_draft"] <= 8 and draft["predicted_speedup"] > 0
    assert draft["draft_threshold"] is None or 0 < draft["draft_threshold"] < 1
    section = result.inference_section()
    assert section["self_speculative"] == draft
    defaults = inference_defaults(OmegaConf.create({"inference": section}))
    assert (defaults["draft_exit"], defaults["num_draft"]) == (draft["draft_exit"], draft["num_draft"])
    spec = GenerationParams(max_tokens=12, decode_mode="self_speculative", **defaults)  # the served default
    full = generate(model, calib_prompts[:4], GenerationParams(max_tokens=12))
    assert [g.token_ids for g in generate(model, calib_prompts[:4], spec)] == [g.token_ids for g in full]
    assert calibrate(model, calib_prompts[:2], target=TARGET, max_tokens=4, progress=False).draft is None
    with pytest.raises(CheckpointError, match=r"inference.self_speculative.num_draft='x' is not a number"):
        inference_defaults(OmegaConf.create({"inference": {"self_speculative": {"num_draft": "x"}}}))
    with pytest.raises(CheckpointError, match=r"needs num_draft >= 1 and a draft_threshold in 0..1"):
        inference_defaults(OmegaConf.create({"inference": {"self_speculative": {"num_draft": 0}}}))
