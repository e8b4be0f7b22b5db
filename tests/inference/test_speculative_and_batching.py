"""Self-speculative decoding (lossless) and in-flight batching."""
import pytest
import torch

from nemo_ee.inference.generate import GenerationParams, generate
from nemo_ee.inference.scheduler import ContinuousBatcher
from nemo_ee.inference.speculative import _accept, draft_exit_index


@pytest.mark.parametrize("draft_exit,num_draft", [(1, 1), (1, 3), (2, 4), (3, 6)])
def test_self_speculative_greedy_is_the_full_models_greedy(rope_model, prompts, draft_exit, num_draft):
    accepted = corrected = 0
    for prompt in prompts:
        full = generate(rope_model, [prompt], GenerationParams(max_tokens=20))[0]
        spec = generate(rope_model, [prompt], GenerationParams(max_tokens=20, decode_mode="self_speculative",
                                                              draft_exit=draft_exit, num_draft=num_draft))[0]
        assert spec.token_ids == full.token_ids
        assert set(spec.exit_layers) <= {draft_exit, 4}
        accepted += spec.exit_layers.count(draft_exit)
        corrected += spec.exit_layers[1:].count(4)
    # both branches ran: drafts kept and drafts rejected (or the bonus token after a full accept)
    assert accepted > 0 and corrected > 0, (accepted, corrected)


def test_self_speculative_stop_token(rope_model, prompts):
    full = generate(rope_model, prompts[:1], GenerationParams(max_tokens=20))[0]
    stop = full.token_ids[7]
    spec = generate(rope_model, prompts[:1], GenerationParams(max_tokens=20, decode_mode="self_speculative",
                                                             num_draft=4, stop_token_ids=(stop,)))[0]
    assert spec.token_ids == full.token_ids[:full.token_ids.index(stop) + 1] and spec.finish_reason == "stop"


def test_self_speculative_reports_each_token_as_it_is_final(rope_model, prompts, monkeypatch):
    from nemo_ee.inference import speculative
    from nemo_ee.inference.engine import EarlyExitEngine

    steps = []
    real_step = EarlyExitEngine.step
    monkeypatch.setattr(EarlyExitEngine, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    params = GenerationParams(max_tokens=20, decode_mode="self_speculative", draft_exit=2, num_draft=4)
    calls = []
    gen = speculative.generate_self_speculative(
        rope_model, prompts[0], params, on_token=lambda *call: calls.append(call + (len(steps),)))
    assert [(t, d) for t, d, _, _, _ in calls] == list(zip(gen.token_ids, gen.exit_layers))
    assert [f for _, _, f, _, _ in calls] == [False] * (len(calls) - 1) + [True]
    assert [r for _, _, _, r, _ in calls] == [""] * (len(calls) - 1) + ["length"] and gen.finish_reason == "length"
    # streamed as they are decided: the first token right after prefill, then after each verify (1 + 5k steps)
    seen = [n for *_, n in calls]
    assert seen[0] == 1 and seen == sorted(seen) and seen[-1] == len(steps)
    assert all(n % (params.num_draft + 1) == 1 for n in seen[1:-1]), seen
    # a callback that answers False stops the generation after that token
    kept = []
    stopped = speculative.generate_self_speculative(rope_model, prompts[0], params,
                                                    on_token=lambda t, *_: kept.append(t) or len(kept) < 5)
    assert stopped.token_ids == gen.token_ids[:5] and stopped.finish_reason == "cancelled"


def test_rejection_sampling_keeps_the_target_distribution():
    from nemo_ee.inference.sampling import probabilities

    params = GenerationParams(temperature=1.0, seed=0)
    target_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0] * 5])
    q = torch.softmax(torch.tensor([0.0, 2.0, 1.0, 0.0, -1.0]), dim=-1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    n = 20000
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=g))
        tokens, _ = _accept([draft], [q], target_logits, params, g)
        counts[tokens[0]] += 1
    p = probabilities(target_logits[0], params.sampling)
    assert (counts / n - p).abs().max() < 0.015, (counts / n, p)


def test_draft_exit_errors(rope_model):
    assert draft_exit_index(rope_model, None) == 0 and draft_exit_index(rope_model, 3) == 2
    with pytest.raises(ValueError, match=r"draft_exit=4 is not an exit layer of this model \(exits at \[1, 2, 3\]\)"):
        draft_exit_index(rope_model, 4)


def test_requests_joining_a_running_batch(rope_model, prompts):
    params = [GenerationParams(max_tokens=6 + 2 * i, threshold=0.2, seed=i) for i in range(len(prompts))]
    batcher = ContinuousBatcher(rope_model, max_batch=3)
    ids, streamed = [], {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids.append(batcher.submit(prompt, p))
        if i % 2:  # requests arrive while others are decoding
            for event in batcher.step():
                streamed.setdefault(event.request_id, []).append(event.token)
    while batcher.busy:
        for event in batcher.step():
            streamed.setdefault(event.request_id, []).append(event.token)
    for rid, prompt, p in zip(ids, prompts, params):
        alone = generate(rope_model, [prompt], p)[0]
        out = batcher.result(rid)
        assert (out.token_ids, out.exit_layers) == (alone.token_ids, alone.exit_layers)
        assert streamed[rid] == alone.token_ids
    assert sorted(batcher.free) == [0, 1, 2]
