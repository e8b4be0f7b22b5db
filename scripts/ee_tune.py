"""EE-Tuning: train the exits of an early-exit GPT .nemo with the backbone frozen (conf/ee_tuning.yaml).

    python scripts/add_exits.py --in model.nemo --out ee.nemo --exit-layers 2 4
    python scripts/ee_tune.py restore_from=ee.nemo output=ee_tuned.nemo max_steps=200

Single process, TP=PP=1. See nemo_ee/tuning/ee_tune.py.
"""
from nemo.core.config import hydra_runner

from nemo_ee.tuning.ee_tune import tune_nemo


@hydra_runner(config_path="../conf", config_name="ee_tuning")
def main(cfg) -> None:
    tune_nemo(cfg)


if __name__ == "__main__":
    main()
