"""Self-speculative decoding (lossless) and in-flight batching."""
import itertools

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


def count_steps(monkeypatch):
    from nemo_ee.inference.engine import EarlyExitEngine

    steps = []
    real_step = EarlyExitEngine.step
    monkeypatch.setattr(EarlyExitEngine, "step", lambda self, *a, **k: steps.append(len(a[0])) or real_step(self, *a, **k))
    return steps


def test_batched_self_speculative_is_every_rows_full_greedy(rope_model, prompts, monkeypatch):
    spec = GenerationParams(max_tokens=16, decode_mode="self_speculative", draft_exit=2, num_draft=3)
    full = generate(rope_model, prompts, GenerationParams(max_tokens=16))
    steps = count_steps(monkeypatch)
    alone = [generate(rope_model, [p], spec)[0] for p in prompts]
    alone_steps = len(steps)
    steps.clear()
    batched = generate(rope_model, prompts, spec)
    for f, a, b in zip(full, alone, batched):
        assert b.token_ids == f.token_ids == a.token_ids  # lossless, row by row
        assert b.exit_layers == a.exit_layers  # each row accepted exactly what it accepts alone
    accepted = [g.exit_layers.count(2) for g in batched]
    assert len(set(accepted)) > 1  # ragged: rows accepted different numbers of drafts
    # one batched forward per step for all rows, not one per row: far fewer steps than one at a time
    assert max(steps) == len(prompts) and len(steps) < alone_steps / 3, (len(steps), alone_steps)


def test_self_speculative_rows_share_a_batch_with_other_modes(rope_model, prompts):
    params = [GenerationParams(max_tokens=12, decode_mode="self_speculative", num_draft=2),
              GenerationParams(max_tokens=9, threshold=0.2),
              GenerationParams(max_tokens=12, decode_mode="self_speculative", draft_exit=3, num_draft=4,
                               temperature=0.8, seed=4),
              GenerationParams(max_tokens=7, decode_mode="full"),
              GenerationParams(max_tokens=10, temperature=1.0, top_k=8, seed=2, threshold=0.3),
              GenerationParams(max_tokens=11, decode_mode="self_speculative", draft_threshold=0.3)]
    mixed = generate(rope_model, prompts, params)
    for prompt, p, out in zip(prompts, params, mixed):
        alone = generate(rope_model, [prompt], p)[0]
        assert (out.token_ids, out.exit_layers, out.finish_reason) == (alone.token_ids, alone.exit_layers,
                                                                       alone.finish_reason)


def test_adaptive_draft_length(rope_model, prompts, monkeypatch):
    full = generate(rope_model, prompts, GenerationParams(max_tokens=16))
    steps = count_steps(monkeypatch)
    runs = {}
    for threshold in (None, 0.0, 0.2, 1.0):
        steps.clear()
        params = GenerationParams(max_tokens=16, decode_mode="self_speculative", draft_exit=1, num_draft=4,
                                  draft_threshold=threshold)
        outs = [generate(rope_model, [p], params)[0] for p in prompts]
        assert [o.token_ids for o in outs] == [f.token_ids for f in full]  # lossless whatever the length
        runs[threshold] = (len(steps), [o.exit_layers for o in outs])
    assert runs[0.0] == runs[None]  # a max probability is never below 0: always the full num_draft
    def longest_accepted_run(layers):  # consecutive tokens from drafts (depth 1)
        return max((len(list(g)) for depth, g in itertools.groupby(layers) if depth == 1), default=0)

    # at 1.0 every round stops after its first draft, so no two drafted tokens follow each other
    assert max(map(longest_accepted_run, runs[1.0][1])) == 1
    assert max(map(longest_accepted_run, runs[None][1])) > 1
    assert runs[1.0][0] != runs[None][0] and runs[0.2][0] != runs[None][0]
    with pytest.raises(ValueError, match=r"draft_threshold=1.5 must be a max probability in 0..1 \(or None\)"):
        GenerationParams(decode_mode="self_speculative", draft_threshold=1.5)
