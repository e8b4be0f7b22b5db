"""Early-exit decoding against the naive no-cache reference: tokens and exit layers identical."""
import pytest
import torch

from nemo_ee.inference.generate import GenerationParams, generate
from nemo_ee.inference.reference import reference_generate

GRID = [("max_prob", 0.15), ("max_prob", 0.2), ("max_prob", 0.3), ("entropy", 2.5), ("entropy", 3.2),
        ("top2_margin", 0.05), ("top2_margin", 0.15)]


def check_against_reference(model, prompts, grid, max_tokens=14):
    depths, switches = set(), 0
    for policy, threshold in grid:
        params = GenerationParams(max_tokens=max_tokens, exit_policy=policy, threshold=threshold)
        outs = generate(model, prompts, params)  # batched: every row decides its own exits
        for prompt, out in zip(prompts, outs):
            ref = reference_generate(model, prompt, params)
            assert out.token_ids == ref.token_ids, (policy, threshold, prompt)
            assert out.exit_layers == ref.exit_layers, (policy, threshold, prompt)
            depths.update(out.exit_layers)
            switches += sum(a < b for a, b in zip(out.exit_layers, out.exit_layers[1:]))
    return depths, switches


def test_kv_recomputation_matches_reference_rope_block_exits(rope_model, prompts):
    depths, switches = check_against_reference(rope_model, prompts, GRID)
    # the grid must exercise early exits at every exit, full-depth tokens, and deep-after-shallow
    # steps (each of which recomputes the missing deep KV)
    assert depths == {1, 2, 3, 4}, depths
    assert switches >= 10, switches


def test_kv_recomputation_matches_reference_learned_positions(gpt2_model, prompts):
    depths, switches = check_against_reference(gpt2_model, prompts[:4], GRID[:4])
    assert len(depths) >= 3 and 4 in depths, depths
    assert switches >= 3, switches


@pytest.mark.parametrize("threshold", [None, 1.01, 5.0])
def test_never_firing_threshold_is_the_full_model(rope_model, prompts, threshold):
    params = GenerationParams(max_tokens=12, threshold=threshold)
    full = GenerationParams(max_tokens=12, decode_mode="full", threshold=0.0)
    for prompt, out, ref in zip(prompts, generate(rope_model, prompts, params), generate(rope_model, prompts, full)):
        assert out.token_ids == ref.token_ids
        assert out.exit_layers == [4] * 12
        with torch.no_grad():  # and the full model is megatron's own forward, greedy
            seq = list(prompt)
            for _ in range(3):
                logits = rope_model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), None).output
                seq.append(int(logits[0, -1].argmax()))
            assert out.token_ids[:3] == seq[len(prompt):]


def test_active_exit_subset(rope_model, prompts):
    params = GenerationParams(max_tokens=12, threshold=0.15, active_exits=(3,))
    for prompt, out in zip(prompts, generate(rope_model, prompts, params)):
        ref = reference_generate(rope_model, prompt, params)
        assert (out.token_ids, out.exit_layers) == (ref.token_ids, ref.exit_layers)
        assert set(out.exit_layers) <= {3, 4}
    with pytest.raises(ValueError, match=r"active exit layers \[5\] are not exits of this model \(exits at \[1, 2, 3\]\)"):
        generate(rope_model, prompts[:1], GenerationParams(threshold=0.5, active_exits=(5,)))


def test_each_row_of_a_batch_generates_what_it_generates_alone(rope_model, prompts):
    per_row = [GenerationParams(max_tokens=10 + i, exit_policy=p, threshold=t, seed=i, temperature=0.0 if i % 2 else 0.8,
                                top_k=0 if i % 3 else 8)
               for i, (p, t) in enumerate(GRID[1:1 + len(prompts)])]
    batched = generate(rope_model, prompts, per_row)
    for prompt, params, out in zip(prompts, per_row, batched):
        alone = generate(rope_model, [prompt], params)[0]
        assert (out.token_ids, out.exit_layers) == (alone.token_ids, alone.exit_layers)
        assert len(out.token_ids) == params.max_tokens


def test_sampling_matches_reference_with_seed(rope_model, prompts):
    for params in (GenerationParams(max_tokens=12, threshold=0.2, temperature=0.9, top_k=10, seed=3),
                   GenerationParams(max_tokens=12, threshold=0.2, temperature=1.3, top_p=0.8, seed=4)):
        outs = generate(rope_model, prompts[:3], params)
        for prompt, out in zip(prompts[:3], outs):
            ref = reference_generate(rope_model, prompt, params)
            assert (out.token_ids, out.exit_layers) == (ref.token_ids, ref.exit_layers)
    a = generate(rope_model, prompts[:1], GenerationParams(max_tokens=12, temperature=1.5, seed=1))[0]
    b = generate(rope_model, prompts[:1], GenerationParams(max_tokens=12, temperature=1.5, seed=2))[0]
    assert a.token_ids != b.token_ids  # the seed matters


def test_stop_tokens_and_limits(rope_model, prompts):
    free = generate(rope_model, prompts[:1], GenerationParams(max_tokens=12))[0]
    stop = free.token_ids[4]
    out = generate(rope_model, prompts[:1], GenerationParams(max_tokens=12, stop_token_ids=(stop,)))[0]
    first = free.token_ids.index(stop)
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    assert free.finish_reason == "length"
    long_prompt = [1] * 45  # the context holds 48 positions
    out = generate(rope_model, [long_prompt], GenerationParams(max_tokens=10))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "context"
    with pytest.raises(ValueError, match="the prompt has 48 tokens; the context holds 48, so at most 47"):
        generate(rope_model, [[1] * 48], GenerationParams())
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(rope_model, [[]], GenerationParams())
    with pytest.raises(ValueError, match=r"token ids \[64\] are outside the vocabulary 0..63"):
        generate(rope_model, [[1, 64]], GenerationParams())


def test_per_exit_thresholds(rope_model, prompts):
    params = GenerationParams(max_tokens=12, exit_thresholds={1: 0.6, 3: 0.15})
    depths = set()
    for prompt, out in zip(prompts, generate(rope_model, prompts, params)):
        ref = reference_generate(rope_model, prompt, params)
        assert (out.token_ids, out.exit_layers) == (ref.token_ids, ref.exit_layers)
        depths.update(out.exit_layers)
    assert 2 not in depths and 3 in depths, depths  # exit 2 has no threshold: never used
    with pytest.raises(ValueError, match=r"active exit layers \[7\] are not exits of this model"):
        GenerationParams(exit_thresholds={7: 0.5}).rule([1, 2, 3])
    with pytest.raises(ValueError, match="early_exit_threshold -1 is outside the range of 'max_prob'"):
        GenerationParams(exit_thresholds={1: -1}).rule([1, 2, 3])


@pytest.mark.parametrize("which", ["rope_model", "gpt2_model"])
def test_every_tensor_the_decoder_makes_is_on_the_models_device(which, prompts, request):
    """With torch's default device set to "meta", a tensor made without ``device=`` is a meta tensor and any op
    mixing it with the model's fails: decoding that still gives the same tokens places everything on the model's
    device explicitly, as a model on a GPU needs (no GPU here to run one)."""
    from nemo_ee.inference.scheduler import ContinuousBatcher

    model = request.getfixturevalue(which)
    cases = [GenerationParams(max_tokens=10, threshold=0.3), GenerationParams(max_tokens=10, exit_policy="entropy",
             threshold=3.0, temperature=0.8, top_k=20, top_p=0.9, seed=3),
             GenerationParams(max_tokens=10, decode_mode="self_speculative", num_draft=3),
             GenerationParams(max_tokens=10, decode_mode="self_speculative", num_draft=2, temperature=1.0, seed=2)]

    def decode():
        outs = [(g.token_ids, g.exit_layers) for params in cases for g in generate(model, prompts[:3], params)]
        batcher = ContinuousBatcher(model, 2)
        ids = [batcher.submit(p, cases[i % 2]) for i, p in enumerate(prompts[:3])]
        while batcher.busy:
            batcher.step()
        return outs + [batcher.result(i).token_ids for i in ids]

    want = decode()
    torch.set_default_device("meta")
    try:
        got = decode()
    finally:
        torch.set_default_device(None)
    assert got == want


def test_exit_vocabulary_matches_reference(rope_model, prompts):
    """Exits that score only some token ids (a slice of their output matrix): same tokens and exits as the
    reference decoder masking full exit logits to those ids, and every early token is one of them."""
    vocab = tuple(range(0, 64, 2))  # the even ids
    depths = set()
    for threshold in (0.15, 0.3):
        params = GenerationParams(max_tokens=12, threshold=threshold, exit_vocab=vocab)
        for prompt, out in zip(prompts, generate(rope_model, prompts, params)):
            ref = reference_generate(rope_model, prompt, params)
            assert (out.token_ids, out.exit_layers) == (ref.token_ids, ref.exit_layers)
            assert all(t % 2 == 0 for t, d in zip(out.token_ids, out.exit_layers) if d < 4)
            depths.update(out.exit_layers)
    assert len(depths) >= 3, depths
    spec = GenerationParams(max_tokens=12, decode_mode="self_speculative", exit_vocab=vocab, num_draft=3)
    full = generate(rope_model, prompts, GenerationParams(max_tokens=12))
    assert [g.token_ids for g in generate(rope_model, prompts, spec)] == [g.token_ids for g in full]  # lossless
    with pytest.raises(ValueError, match=r"exit_vocab id 64 is outside the vocabulary 0..63"):
        generate(rope_model, prompts[:1], GenerationParams(max_tokens=2, threshold=0.1, exit_vocab=(1, 64)))
    with pytest.raises(ValueError, match=r"exit_vocab must be distinct token ids >= 0 \(got 3 ids, 2 distinct"):
        GenerationParams(exit_vocab=(1, 1, 2))
