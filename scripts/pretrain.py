"""Pretrain an early-exit GPT from a Hydra recipe (default: conf/ee_gpt_tiny.yaml on the stdlib corpus).

    python scripts/pretrain.py [trainer.max_steps=50] [model.arch.exit_layer_nums=[2,4,6]] ...
"""
from nemo.core.config import hydra_runner

from nemo_ee.train import pretrain


@hydra_runner(config_path="../conf", config_name="ee_gpt_tiny")
def main(cfg) -> None:
    pretrain(cfg)


if __name__ == "__main__":
    main()
