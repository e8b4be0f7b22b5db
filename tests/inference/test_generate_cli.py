"""scripts/generate.py: printed text = tokenizer.decode(generate(...)), exit markup, STATS line, clear errors."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nemo_ee.inference.generate import GenerationParams, generate
from nemo_ee.inference.render import marked_depths, parse_stats, strip_marks
from tests.inference.conftest import bigram_batch, train_model
from tests.inference.test_calibrate import word, write_tiny_nemo

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(world):
    return train_model()


@pytest.fixture(scope="module")
def nemo_path(model, tmp_path_factory):
    return write_tiny_nemo(model, tmp_path_factory.mktemp("gen") / "tiny.nemo")


@pytest.fixture(scope="module")
def texts(model):
    seqs = bigram_batch(torch.Generator().manual_seed(11), 3, 5, model.bigram_table).tolist()
    return [" ".join(word(max(i, 2)) for i in s) for s in seqs]


def config(**overrides):
    cfg = OmegaConf.load(REPO / "conf" / "ee_generate.yaml")
    return OmegaConf.merge(cfg, overrides)


def run(**overrides):
    from nemo_ee.inference.cli import run_generate

    out = io.StringIO()
    result = run_generate(config(**overrides), out=out)
    return out.getvalue(), result


def blocks(printed):
    """{prompt number: printed text} and the STATS line."""
    lines = printed.splitlines()
    texts = {int(line.split("/")[0][5:]): lines[i + 1] for i, line in enumerate(lines) if line.startswith("--- [")}
    return texts, lines[-1]


def test_printed_text_is_the_decoded_generation(nemo_path, texts):
    from nemo_ee.inference.loading import load_nemo_for_inference

    printed, result = run(nemo=str(nemo_path), prompts=texts, max_tokens=12, threshold=0.1, stop_at_eos=False)
    nemo = load_nemo_for_inference(nemo_path)
    ids = [nemo.tokenizer.encode(t) for t in texts]
    expected = generate(nemo.model, ids, GenerationParams(max_tokens=12, threshold=0.1))
    shown, stats_line = blocks(printed)
    assert len(shown) == 3
    for i, (text, gen) in enumerate(zip(texts, expected)):
        assert shown[i + 1] == text + nemo.tokenizer.decode(gen.token_ids)
        assert result["generations"][i].token_ids == gen.token_ids
    depths = [d for g in expected for d in g.exit_layers]
    assert len(set(depths)) > 1  # threshold 0.1 on this model: some tokens early, some at full depth
    stats = parse_stats(stats_line)
    assert stats["tokens"] == 36 and stats["tokens_per_s"] > 0 and stats["seconds"] > 0
    assert stats["mean_exit_depth"] == pytest.approx(sum(depths) / 36, abs=1e-3)
    assert stats["exit_share"] == pytest.approx({d: depths.count(d) / 36 for d in set(depths)}, abs=1e-3)
    assert stats["tokens_per_s"] == pytest.approx(36 / stats["seconds"], rel=0.02)

    sampled = dict(temperature=0.8, top_k=10, top_p=0.9, seed=3)
    _, result = run(nemo=str(nemo_path), prompts=texts, max_tokens=12, threshold=0.1, stop_at_eos=False, **sampled)
    expected = generate(nemo.model, ids, GenerationParams(max_tokens=12, threshold=0.1, **sampled))
    assert [g.token_ids for g in result["generations"]] == [g.token_ids for g in expected]
    assert result["params"].sampling.top_k == 10

    printed_full, _ = run(nemo=str(nemo_path), prompts=texts, max_tokens=12, decode_mode="full", stop_at_eos=False)
    assert parse_stats(blocks(printed_full)[1])["exit_share"] == {4: 1.0}


def test_show_exits_marks_every_token(nemo_path, texts, tmp_path):
    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("\n".join(texts[1:]) + "\n\n")
    common = dict(nemo=str(nemo_path), prompts=texts[0], prompts_file=str(prompts_file), max_tokens=10,
                  threshold=0.1, stop_at_eos=False)
    printed, result = run(show_exits=True, **common)
    plain, _ = run(**common)
    shown, plain_shown = blocks(printed)[0], blocks(plain)[0]
    assert len(shown) == 3
    for i, (text, gen) in enumerate(zip(texts, result["generations"])):
        marked = shown[i + 1][len(text):]
        assert marked_depths(marked) == gen.exit_layers and len(gen.exit_layers) == 10
        assert strip_marks(marked) == plain_shown[i + 1][len(text):]
        first = f"{word(gen.token_ids[0])}\u27e8{gen.exit_layers[0]}\u27e9"
        assert marked.startswith(first), (marked, first)  # tok⟨depth⟩


def test_stop_words_and_request_errors(nemo_path, texts, model):
    from nemo_ee.inference.cli import stop_token_ids
    from nemo_ee.inference.loading import load_nemo_for_inference

    tokenizer = load_nemo_for_inference(nemo_path).tokenizer
    assert stop_token_ids(tokenizer, ["t5", "t9"], True) == (0, 5, 9)
    with pytest.raises(ValueError, match=r"stop word 't5 t9' is 2 tokens \[5, 9\]; stop words must be single tokens"):
        stop_token_ids(tokenizer, ["t5 t9"], False)
    # the full model's 3rd greedy token as a stop word: generation stops right there
    first = generate(model, [tokenizer.encode(texts[0])], GenerationParams(max_tokens=8, decode_mode="full"))[0]
    stop = word(first.token_ids[2])
    _, result = run(nemo=str(nemo_path), prompts=[texts[0]], max_tokens=8, decode_mode="full", stop_words=[stop],
                    stop_at_eos=False)
    gen = result["generations"][0]
    assert gen.finish_reason == "stop" and gen.token_ids == first.token_ids[:first.token_ids.index(first.token_ids[2]) + 1]
    with pytest.raises(ValueError, match="no prompts: give prompts="):
        run(nemo=str(nemo_path))
    with pytest.raises(ValueError, match=r"active exit layers \[7\] are not exits of this model"):
        run(nemo=str(nemo_path), prompts=texts, threshold=0.5, active_exits=[7])
    with pytest.raises(ValueError, match="exit_policy 'fast' is not one of"):
        run(nemo=str(nemo_path), prompts=texts, exit_policy="fast", threshold=0.5)
    with pytest.raises(FileNotFoundError, match="prompts_file .*absent.txt does not exist"):
        run(nemo=str(nemo_path), prompts_file="absent.txt")


def test_calibrated_defaults_and_policy_mismatch(nemo_path, texts, tmp_path):
    from nemo_ee.inference.cli import write_inference_section

    calibrated = write_inference_section(nemo_path, tmp_path / "c.nemo", {
        "exit_policy": "max_prob", "exit_thresholds": {2: 0.1}, "calibration": {"target": 0.9}})
    _, result = run(nemo=str(calibrated), prompts=texts, max_tokens=6)
    assert result["params"].exit_thresholds == {2: 0.1} and result["params"].threshold is None
    assert {d for g in result["generations"] for d in g.exit_layers} <= {2, 4}
    _, result = run(nemo=str(calibrated), prompts=texts, max_tokens=6, threshold=0.2)
    assert result["params"].exit_thresholds is None and result["params"].threshold == 0.2
    with pytest.raises(ValueError, match="exit_policy=entropy but the .nemo's thresholds were calibrated for max_prob"):
        run(nemo=str(calibrated), prompts=texts, exit_policy="entropy")


def test_script_runs_and_a_corrupt_nemo_fails_first(nemo_path, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    corrupt = tmp_path / "corrupt.nemo"
    data = nemo_path.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    # the prompts are also missing: the .nemo error comes first
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), f"nemo={corrupt}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert f"error: {corrupt}" in bad.stderr and ("corrupt" in bad.stderr or "truncated" in bad.stderr)
    ok = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), f"nemo={nemo_path}",
                         'prompts=["t5 t6", "t7"]', "threshold=0.1", "show_exits=true", "max_tokens=5"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    shown, stats_line = blocks(ok.stdout)
    assert shown[1].startswith("t5 t6") and len(marked_depths(shown[1])) == len(marked_depths(shown[2]))
    stats = parse_stats(stats_line)
    assert 2 <= stats["tokens"] <= 10 and sum(stats["exit_share"].values()) == pytest.approx(1.0, abs=2e-3)
