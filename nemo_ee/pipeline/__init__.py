"""The main job as stages (corpus, pretrain plain / early-exit, add exits, EE-Tuning, evaluate) with resume."""
from nemo_ee.pipeline.runner import load_config, plan_pipeline, run_pipeline

__all__ = ["load_config", "plan_pipeline", "run_pipeline"]
