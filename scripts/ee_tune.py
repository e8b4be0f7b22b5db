"""EE-Tuning: train the exits of an early-exit GPT .nemo with the backbone frozen (conf/ee_tuning.yaml).

    python scripts/add_exits.py --in model.nemo --out ee.nemo --exit-layers 2 4
    python scripts/ee_tune.py restore_from=ee.nemo output=ee_tuned.nemo max_steps=200
    python scripts/ee_tune.py restore_from=ee.nemo output=ee_tuned.nemo seq_length=512 loss=kl   # distil the final layer

Pipeline parallel, one process per stage (the tuning model is the backbone up to the last exit, split into
pipeline_model_parallel_size stages; each rank reads only its stage's tensors from the .nemo; loss=ce only):

    torchrun --nproc_per_node 2 scripts/ee_tune.py restore_from=ee.nemo output=ee_tuned.nemo \
        pipeline_model_parallel_size=2 num_microbatches=4

See conf/ee_tuning.yaml, nemo_ee/tuning/ee_tune.py (TP=PP=1) and nemo_ee/tuning/pipeline.py (PP > 1).
"""
from nemo.core.config import hydra_runner

from nemo_ee.tuning.ee_tune import tune_nemo


@hydra_runner(config_path="../conf", config_name="ee_tuning")
def main(cfg) -> None:
    tune_nemo(cfg)


if __name__ == "__main__":
    main()
