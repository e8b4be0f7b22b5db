"""A small early-exit model trained for a few seconds on a synthetic bigram language.

Trained exits are confident on some tokens and not on others, so decoding exercises every path:
early and full-depth tokens in one sequence, KV recomputation, accepted and rejected drafts.
"""
import pytest
import torch

V = 64
STEPS = 20


def bigram_batch(g: torch.Generator, batch: int, length: int, table: torch.Tensor) -> torch.Tensor:
    """Sequences where each token follows its dominant successor 75% of the time."""
    seq = torch.empty(batch, length, dtype=torch.long)
    seq[:, 0] = torch.randint(0, V, (batch,), generator=g)
    for t in range(1, length):
        follow = torch.rand(batch, generator=g) < 0.75
        seq[:, t] = torch.where(follow, table[seq[:, t - 1]], torch.randint(0, V, (batch,), generator=g))
    return seq


def train_model(**overrides):
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.models import build_model

    arch = dict(num_layers=4, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96, vocab_size=V,
                seq_length=48, exit_layer_nums=[1, 2, 3], exit_loss_weights=1.0)
    arch.update(overrides)
    torch.manual_seed(0)
    model = build_model(EarlyExitConfig(**arch))
    g = torch.Generator().manual_seed(0)
    table = torch.randperm(V, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        seq = bigram_batch(g, 8, 33, table)
        tokens, labels = seq[:, :-1], seq[:, 1:]
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        out = model(tokens, pos, None, labels=labels)
        loss = out.output.mean() + sum(v.mean() for v in out.exits.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.bigram_table = table
    return model


@pytest.fixture(scope="module")
def world():
    from nemo_ee.parallel.initialize import initialize_distributed

    initialize_distributed(1, 1, seed=1234)


@pytest.fixture(scope="module")
def rope_model(world):
    """RoPE, GQA, SwiGLU, RMSNorm; exits with a block and an MLP."""
    return train_model(position_embedding_type="rope", num_query_groups=2, activation="swiglu",
                       normalization="RMSNorm", exit_block=True, exit_mlp=True)


@pytest.fixture(scope="module")
def gpt2_model(world):
    """Learned positions, LayerNorm, GELU, biases; plain exits (norm + projection)."""
    return train_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in (1, 3, 6, 9, 12, 17)]
