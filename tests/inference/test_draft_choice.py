"""Choosing self-speculative settings by replaying teacher-forced draft statistics; the roofline's inputs."""
import pytest
import torch

from nemo_ee.inference.draft_choice import DraftStats, choose, draft_stats, replay


def stats(agree, conf, layer=1):
    return DraftStats({layer: [torch.tensor(agree)]}, {layer: [torch.tensor(conf)]})


def test_replay_counts_rounds_by_hand():
    s = stats([True, True, False, True, True, True], [0.9] * 6)
    # k=2: two rounds of 2 accepted drafts + the full model's token = 6 tokens for 2 x (2 x 0.5 + 1)
    assert replay(s, 1, 2, None, 0.5) == pytest.approx(6 / 4)
    s = stats([True, False, False, False, False, True], [0.9, 0.1, 0.1, 0.1, 0.1, 0.9])
    # fixed k=4 drafts 4, 3, 2, 1, 0 in its five rounds (one accepted in the first): 6 tokens for 10 units
    assert replay(s, 1, 4, None, 0.5) == pytest.approx(6 / 10)
    # threshold 0.5: each round stops after its first unconfident draft: 2, 1, 1, 1, 0 drafts, 7.5 units
    assert replay(s, 1, 4, 0.5, 0.5) == pytest.approx(6 / 7.5)
    best = choose(s, {1: 0.5}, ks=[4], thresholds=[0.5])
    assert best["fixed"] == (1, 4, pytest.approx(0.6)) and best["adaptive"] == (1, 4, 0.5, pytest.approx(0.8))


def test_draft_stats_cover_answer_positions(rope_model, prompts):
    from nemo_ee.inference.generate import GenerationParams, generate

    answers = [g.token_ids for g in generate(rope_model, prompts[:3], GenerationParams(max_tokens=7))]
    s = draft_stats(rope_model, prompts[:3], answers)
    assert sorted(s.agree) == [1, 2, 3]
    for layer in s.agree:
        assert [len(a) for a in s.agree[layer]] == [7, 7, 7]
        assert all(bool(((c > 0) & (c <= 1)).all()) for c in s.conf[layer])
        assert 0.0 <= s.acceptance(layer) <= 1.0
    # a draft that always agrees (the final layer itself) would accept every draft: k=3 at no draft cost
    perfect = DraftStats({9: [torch.ones(7, dtype=torch.bool)]}, {9: [torch.ones(7)]})
    assert replay(perfect, 9, 3, None, 0.0) == pytest.approx(7 / 2)  # rounds: 3 drafts + 1, then 2 drafts + 1


def test_roofline_inputs_and_batch_plot(rope_model, tmp_path):
    from nemo_ee.inference.bench_real import batch_plot, copy_bandwidth, weight_bytes

    layers = sum(p.numel() for p in rope_model.decoder.parameters())
    assert rope_model.ee_config.share_embeddings_and_output_weights  # the head reads the whole embedding
    head = rope_model.shared_embedding_or_output_weight()
    assert weight_bytes(rope_model) == 4 * (layers + head.numel())
    assert copy_bandwidth(megabytes=8, repeats=2) > 1e8  # any machine copies more than 100 MB/s
    png = batch_plot(tmp_path / "b.png", {"full depth": {1: 10.0, 2: 18.0}, "HF generate": {1: 9.0, 2: 15.0}},
                     7.0, "note")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
