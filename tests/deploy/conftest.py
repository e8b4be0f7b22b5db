"""A small early-exit .nemo whose exits mean something, and prompts it continues differently.

The NeMo model of the tiny recipe (4 layers, exits after layers 1 and 2, a 512-token BPE of the stdlib) is
trained for a few seconds on a bigram language over 64 of its tokens (the printable ASCII bytes): each token
is followed by its own successor 75% of the time. Exits become confident on some tokens and not on others,
so early-exit decoding mixes depths 1, 2 and 4, and every prompt has its own continuation. Calibrated-style
per-exit thresholds are written into the .nemo's ``inference`` section, as scripts/calibrate.py would.
"""
from pathlib import Path

import pytest
import torch

SUBSET = list(range(2, 66))          # token ids of the byte-level symbols '!' .. '`' (after the 2 specials)
CALIBRATED = {"exit_policy": "max_prob", "exit_thresholds": {1: 0.6, 2: 0.4}}
STEPS = 40


def bigram_sequences(g: torch.Generator, perm: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    subset = torch.tensor(SUBSET)
    idx = torch.empty(batch, length, dtype=torch.long)
    idx[:, 0] = torch.randint(0, len(SUBSET), (batch,), generator=g)
    for t in range(1, length):
        follow = torch.rand(batch, generator=g) < 0.75
        idx[:, t] = torch.where(follow, perm[idx[:, t - 1]], torch.randint(0, len(SUBSET), (batch,), generator=g))
    return subset[idx]


def build_bigram_nemo(root: Path) -> tuple[Path, list[str]]:
    """(path of the trained .nemo, prompts: texts whose tokens are bigram sequences that re-encode exactly)."""
    from nemo_ee.inference.cli import write_inference_section
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel, prepare_config
    from tests.models.test_nemo_model import recipe

    nemo = EarlyExitGPTNeMoModel(prepare_config(recipe(root / "run", 1).model))
    model, tokenizer = nemo.model, nemo.tokenizer
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(SUBSET), generator=g)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        seq = bigram_sequences(g, perm, 8, 33)
        tokens, labels = seq[:, :-1], seq[:, 1:]
        out = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, labels=labels)
        loss = out.output.mean() + sum(v.mean() for v in out.exits.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    plain = root / "bigram.nemo"
    nemo.save_to(str(plain))
    path = write_inference_section(plain, root / "bigram_calibrated.nemo", CALIBRATED)
    prompts = []
    while len(prompts) < 12:
        ids = bigram_sequences(g, perm, 1, 2 + len(prompts) % 9)[0].tolist()
        text = tokenizer.decode(ids)
        if tokenizer.encode(text) == ids and text not in prompts:
            prompts.append(text)
    return path, prompts


@pytest.fixture(scope="session")
def bigram_nemo(tmp_path_factory):
    """(.nemo path, prompts) built once per test session (~15 s)."""
    from nemo_ee.parallel.initialize import initialize_distributed

    initialize_distributed(1, 1, seed=1234)
    return build_bigram_nemo(tmp_path_factory.mktemp("deploy_nemo"))
