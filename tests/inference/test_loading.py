"""Loading a .nemo for inference: clear errors for bad files, the model's own decoding defaults."""
import shutil
import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from nemo_ee.inference.loading import CheckpointError, check_nemo_file, inference_defaults, load_nemo_for_inference


@pytest.fixture(scope="module")
def nemo_file(tmp_path_factory, world):
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel, prepare_config
    from tests.models.test_nemo_model import recipe

    root = tmp_path_factory.mktemp("nemo")
    cfg = prepare_config(recipe(root / "run", 1).model)
    path = root / "m.nemo"
    EarlyExitGPTNeMoModel(cfg).save_to(str(path))
    return path


def test_bad_files_fail_before_any_model_is_built(tmp_path, nemo_file):
    with pytest.raises(FileNotFoundError, match="no .nemo file at"):
        check_nemo_file(tmp_path / "absent.nemo")
    text = tmp_path / "text.nemo"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="is not a .nemo archive"):
        check_nemo_file(text)
    cut = tmp_path / "cut.nemo"
    data = nemo_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt|truncated|not a .nemo archive"):
        load_nemo_for_inference(cut)
    other = tmp_path / "other.nemo"
    with tarfile.open(other, "w") as tar:
        tar.add(__file__, arcname="./model_config.yaml")
    with pytest.raises(CheckpointError, match=r"lacks \['model_weights.safetensors'\]"):
        check_nemo_file(other)


def test_mismatched_weights_are_named(tmp_path, nemo_file):
    src = tmp_path / "x"
    with tarfile.open(nemo_file) as tar:
        tar.extractall(src, filter="data")
    cfg_path = next(src.rglob("model_config.yaml"))
    cfg = OmegaConf.load(cfg_path)
    cfg.arch.num_layers = int(cfg.arch.num_layers) + 1  # the config now wants a layer the weights lack
    OmegaConf.save(cfg, cfg_path)
    bad = tmp_path / "bad.nemo"
    with tarfile.open(bad, "w") as tar:
        for item in src.iterdir():
            tar.add(item, arcname="./" + item.name)
    with pytest.raises(CheckpointError, match="the weights do not match the model its config describes"):
        load_nemo_for_inference(bad)


def test_defaults_from_the_config(nemo_file):
    model = load_nemo_for_inference(nemo_file)
    assert not model.training and inference_defaults(model.cfg) == {}
    cfg = OmegaConf.create({"inference": {"exit_policy": "entropy", "exit_thresholds": {"2": 0.5, "4": 1.5}}})
    assert inference_defaults(cfg) == {"exit_policy": "entropy", "exit_thresholds": {2: 0.5, 4: 1.5}}
    with pytest.raises(CheckpointError, match="inference.exit_policy 'fast' is not one of"):
        inference_defaults(OmegaConf.create({"inference": {"exit_policy": "fast"}}))
    with pytest.raises(ValueError, match="early_exit_threshold -2 is outside the range"):
        inference_defaults(OmegaConf.create({"inference": {"exit_thresholds": {"2": -2}}}))
