"""EarlyExitGPTModel: parity with megatron's GPTModel, every exit-head combination, tied exits."""
import itertools

import pytest
import torch

from nemo_ee.config import EarlyExitConfig

B, S, V = 2, 12, 96


def small(**kw) -> EarlyExitConfig:
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=V, seq_length=S)
    base.update(kw)
    return EarlyExitConfig(**base)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    return tokens, torch.arange(S).expand(B, S), labels


def build(cfg):
    from nemo_ee.models import build_model

    torch.manual_seed(7)
    return build_model(cfg)


@pytest.mark.parametrize(
    "arch",
    [
        dict(),
        dict(normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
             add_bias_linear=False, share_embeddings_and_output_weights=False, num_query_groups=2),
    ],
    ids=["gpt2-like", "llama-like"],
)
def test_no_exit_logits_equal_megatron_gptmodel(single_process, arch):
    from megatron.core.models.gpt.gpt_model import GPTModel

    from nemo_ee.models.early_exit_gpt import layer_spec

    cfg = small(**arch)
    ee = build(cfg).eval()
    ref = GPTModel(
        config=cfg.transformer_config(), transformer_layer_spec=layer_spec(cfg), vocab_size=V,
        max_sequence_length=S, share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
    ).eval()
    assert set(ref.state_dict()) == set(ee.state_dict())
    ref.load_state_dict(ee.state_dict())
    tokens, pos, labels = inputs()
    with torch.no_grad():
        out = ee(tokens, pos, None)
        expected = ref(tokens, pos, None)
        assert out.exits == {}
        assert (out.output - expected).abs().max().item() <= 1e-6
        loss = ee(tokens, pos, None, labels=labels).output
        assert (loss - ref(tokens, pos, None, labels=labels)).abs().max().item() <= 1e-6


HEADS = [dict(exit_norm=n, exit_mlp=m, exit_block=b) for n, m, b in itertools.product([True, False], repeat=3)]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("head", HEADS, ids=lambda h: "+".join(k[5:] for k, v in h.items() if v) or "bare")
def test_every_head_combination_shapes_and_gradients(single_process, head, tied):
    cfg = small(exit_layer_nums=[1, 3], tie_exit_output=tied, **head)
    model = build(cfg)
    tokens, pos, labels = inputs()
    model.eval()
    with torch.no_grad():
        out = model(tokens, pos, None)
    assert out.output.shape == (B, S, V)
    assert sorted(out.exits) == [0, 1]
    assert all(v.shape == (B, S, V) for v in out.exits.values())

    model.train()
    out = model(tokens, pos, None, labels=labels)
    assert out.output.shape == (B, S) and all(v.shape == (B, S) for v in out.exits.values())
    sum(v.sum() for v in out.exits.values()).backward()  # exit losses only
    for name, p in model.exits.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached exits.{name}"
    # layers above the deepest exit (layer 3) get nothing from exit losses
    for name, p in model.decoder.layers[3].named_parameters():
        assert p.grad is None or p.grad.abs().sum() == 0, name
    own_out = [p for n, p in model.exits.named_parameters() if n.endswith("output_layer.weight")]
    assert len(own_out) == (0 if tied else 2)
    if tied:
        assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0


def test_tied_exit_gradient_is_sum_of_contributions(single_process):
    cfg = small(exit_layer_nums=[2], tie_exit_output=True)
    model = build(cfg).train()
    tokens, pos, labels = inputs(1)
    weight = model.embedding.word_embeddings.weight
    assert model.shared_embedding_or_output_weight() is weight
    assert model.exits["0"].output_layer.weight is None

    def grad_of(select):
        model.zero_grad(set_to_none=True)
        out = model(tokens, pos, None, labels=labels)
        select(out).backward()
        return weight.grad.clone()

    g_final = grad_of(lambda o: o.output.sum())
    g_exit = grad_of(lambda o: o.exits[0].sum())
    g_both = grad_of(lambda o: o.output.sum() + o.exits[0].sum())
    assert g_exit.abs().sum() > 0 and g_final.abs().sum() > 0
    torch.testing.assert_close(g_both, g_final + g_exit, rtol=1e-5, atol=1e-6)


def test_pre_at_next_layer_equals_post(single_process):
    post = build(small(exit_layer_nums=[2], exit_position="post", exit_mlp=True)).eval()
    pre = build(small(exit_layer_nums=[3], exit_position="pre", exit_mlp=True)).eval()
    pre.load_state_dict(post.state_dict())
    tokens, pos, _ = inputs(2)
    with torch.no_grad():
        a, b = post(tokens, pos, None).exits[0], pre(tokens, pos, None).exits[0]
    assert torch.equal(a, b)
    first = build(small(exit_layer_nums=[1], exit_position="pre")).eval()
    assert first.exits["0"].point == 0  # reads the embedding output


def test_copied_exit_after_last_layer_reproduces_final_logits(single_process):
    cfg = small(exit_layer_nums=[4])
    model = build(cfg).eval()
    head = model.exits["0"]
    head.norm.load_state_dict(model.decoder.final_layernorm.state_dict())
    head.output_layer.weight.data.copy_(model.shared_embedding_or_output_weight().data)
    tokens, pos, _ = inputs(3)
    with torch.no_grad():
        out = model(tokens, pos, None)
    assert torch.equal(out.exits[0], out.output)


@pytest.mark.parametrize("head", [dict(), dict(exit_block=True, exit_mlp=True)], ids=["norm", "block+mlp"])
def test_outputs_are_causal(single_process, head):
    model = build(small(exit_layer_nums=[1, 2], **head)).eval()
    tokens, pos, _ = inputs(4)
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    with torch.no_grad():
        a, b = model(tokens, pos, None), model(changed, pos, None)
    for x, y in [(a.output, b.output)] + [(a.exits[i], b.exits[i]) for i in (0, 1)]:
        assert torch.equal(x[:, :6], y[:, :6])
        assert not torch.equal(x[:, 6:], y[:, 6:])


def test_exit_block_has_its_own_layer_number(single_process):
    model = build(small(exit_layer_nums=[1, 2], exit_block=True))
    assert [model.exits[k].block.layer_number for k in ("0", "1")] == [5, 6]
    assert [layer.layer_number for layer in model.decoder.layers] == [1, 2, 3, 4]


def test_local_exit_indices_and_state_dict_keys(single_process):
    model = build(small(exit_layer_nums=[1, 3]))
    assert model.local_exit_indices == [0, 1]
    keys = [k for k in model.state_dict() if k.startswith("exits.")]
    assert "exits.0.output_layer.weight" in keys and "exits.1.norm.weight" in keys


def test_sequence_parallel_without_transformer_engine_is_a_clear_error(single_process):
    from nemo_ee.models import build_model

    cfg = small(tensor_model_parallel_size=2, sequence_parallel=True, transformer_impl="local")
    with pytest.raises(ValueError, match="sequence_parallel=True needs transformer-engine"):
        build_model(cfg)
