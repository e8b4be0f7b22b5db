"""The main job, end to end (conf/pipeline_tiny.yaml): corpus -> plain GPT -> add exits -> EE-Tuning, next to
an EE-pretrained GPT of the same size; loss curves, per-exit validation loss, threshold calibration, the decode
sweep, serving on Triton (tritonserver + tritonclient) and every scripts/bench_*.py; writes
outputs/<name>/report.md with its plots. A rerun skips the stages already done.

    python scripts/run_pipeline.py [name=my_run] [pretrain.trainer.max_steps=300] [stages.ee_tune.max_steps=500]
    python scripts/run_pipeline.py stages.pretrain_ee.skip=true stages.pretrain_plain.nemo=plain.nemo
    python scripts/run_pipeline.py stages.triton.skip=true stages.benchmarks.bench_bubble_fill.enabled=false
"""
from nemo.core.config import hydra_runner

from nemo_ee.pipeline import run_pipeline


@hydra_runner(config_path="../conf", config_name="pipeline_tiny")
def main(cfg) -> None:
    run_pipeline(cfg)


if __name__ == "__main__":
    main()
