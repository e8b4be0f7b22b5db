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
