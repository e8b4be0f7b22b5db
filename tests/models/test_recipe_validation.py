"""prepare_config: recipe-level values are rejected with a clear error before anything is trained."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]


def recipe(**model):
    cfg = OmegaConf.load(REPO / "conf" / "ee_gpt_tiny.yaml").model
    cfg.tokenizer.tokenizer_file = "/nonexistent/tokenizer.json"  # never reached by a bad value
    for key, value in model.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bubble_fill_microbatches": 2}, "bubble_fill_microbatches=2 needs pipeline_model_parallel_size > 1"),
        ({"bubble_fill_microbatches": -1}, "bubble_fill_microbatches=-1 must be an integer >= 0"),
        ({"micro_batch_size": 3}, "global_batch_size=16 must be a positive multiple of micro_batch_size=3"),
        ({"arch.exit_layer_nums": [0]}, "exit layer 0 is outside 1..8"),
        ({"optim.lr": -1.0}, "optim.lr=-1.0 must be > 0"),
        ({"data.val_fraction": 2.0}, "val_fraction 2.0 is outside (0, 1)"),
    ],
)
def test_bad_recipe_values(overrides, message):
    from nemo_ee.models.nemo_model import prepare_config

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare_config(recipe(**overrides))


def test_missing_tokenizer_file_is_named():
    from nemo_ee.models.nemo_model import prepare_config

    with pytest.raises(FileNotFoundError, match="tokenizer.tokenizer_file /nonexistent/tokenizer.json does not exist"):
        prepare_config(recipe())


def test_fill_allowed_with_pipeline(tmp_path):
    from nemo_ee.models.nemo_model import prepare_config

    tok = tmp_path / "tok.json"
    from nemo_ee.data import CorpusSpec, EETokenizer, train_tokenizer

    path = train_tokenizer(CorpusSpec(max_files=5), 300, tmp_path)
    EETokenizer.from_file(path).save(tok)
    cfg = prepare_config(recipe(bubble_fill_microbatches=1, **{"arch.pipeline_model_parallel_size": 2,
                                                               "tokenizer.tokenizer_file": str(tok)}))
    assert cfg.bubble_fill_microbatches == 1
