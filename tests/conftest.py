import pytest


@pytest.fixture
def single_process():
    """A world of one with megatron's parallel_state at TP=PP=1, seeded."""
    from nemo_ee.parallel.initialize import initialize_distributed

    initialize_distributed(1, 1, seed=1234)
    yield
