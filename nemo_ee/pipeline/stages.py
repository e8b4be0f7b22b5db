"""The pipeline's stages, one function each, and :data:`STAGES`, the ordered list the runner walks.

To add a stage: in a module ``stage_<topic>.py`` write ``run_<name>(ctx) -> StageResult`` (plus a
``settings`` function for its config hash and, if it has settings to validate, a ``check``), append a
:class:`Stage` to :data:`STAGES`, and give it a ``stages.<name>`` section in conf/pipeline_tiny.yaml.
Its report sections appear in stage order; its artefacts reach the stages that list it in needs / wants.
"""
from __future__ import annotations

from nemo_ee.pipeline.base import Stage
from nemo_ee.pipeline.curves import curves_settings, run_loss_curves
from nemo_ee.pipeline.stage_data import check_corpus, corpus_settings, run_corpus
from nemo_ee.pipeline.stage_decode import (
    CALIBRATE_KEYS, SWEEP_KEYS, calibrate_settings, check_calibrate, check_sweep, run_calibrate, run_sweep,
    sweep_settings,
)
from nemo_ee.pipeline.stage_evaluate import check_evaluate, evaluate_settings, run_evaluate
from nemo_ee.pipeline.stage_pretrain import (
    check_pretrain_ee, check_pretrain_plain, pretrain_ee_settings, pretrain_plain_settings, run_pretrain_ee,
    run_pretrain_plain,
)
from nemo_ee.pipeline import stage_real as real
from nemo_ee.pipeline.stage_serve import (
    BENCH_KEYS, TRITON_KEYS, bench_settings, check_benchmarks, check_triton, run_benchmarks, run_triton,
    triton_settings,
)
from nemo_ee.pipeline.stage_tuning import (
    add_exits_settings, check_add_exits, check_ee_tune, ee_tune_settings, run_add_exits, run_ee_tune,
)

__all__ = ["STAGES"]

STAGES: list[Stage] = [
    Stage("corpus", "corpus and tokenizer", run_corpus, corpus_settings, keys=frozenset({"tokenizer_file"}),
          check=check_corpus),
    Stage("pretrain_plain", "pretrain the GPT without exits", run_pretrain_plain,
          pretrain_plain_settings, wants=("corpus",), pointer="nemo", resumable=True,
          check=check_pretrain_plain),
    Stage("pretrain_ee", "pretrain the early-exit GPT (same size, same steps)", run_pretrain_ee,
          pretrain_ee_settings, wants=("corpus",), pointer="nemo", resumable=True,
          check=check_pretrain_ee),
    Stage("add_exits", "add exits to the plain GPT", run_add_exits, add_exits_settings, needs=("pretrain_plain",),
          pointer="nemo", keys=frozenset({"exit_fractions", "init", "exit_loss_weights"}), check=check_add_exits),
    Stage("ee_tune", "EE-Tuning: train the exits, backbone frozen", run_ee_tune, ee_tune_settings,
          needs=("add_exits",), pointer="nemo", keys=None, check=check_ee_tune),
    Stage("loss_curves", "per-exit loss curves of the pretrainings and of EE-Tuning", run_loss_curves,
          curves_settings, wants=("pretrain_plain", "pretrain_ee", "ee_tune"), needs_any=True),
    Stage("evaluate", "per-exit validation loss, EE-pretrained vs EE-tuned", run_evaluate, evaluate_settings,
          wants=("pretrain_ee", "add_exits", "ee_tune"), needs_any=True,
          keys=frozenset({"val_batches", "batch_size"}), check=check_evaluate),
    Stage("calibrate", "calibrate the exit thresholds of both early-exit models", run_calibrate, calibrate_settings,
          wants=("pretrain_ee", "ee_tune"), needs_any=True, keys=frozenset(CALIBRATE_KEYS), check=check_calibrate),
    Stage("decode_sweep", "threshold sweep: speedup, agreement, exit depth; sample generations", run_sweep,
          sweep_settings, wants=("pretrain_ee", "ee_tune", "calibrate"), needs_any=True,
          keys=frozenset(SWEEP_KEYS), check=check_sweep),
    Stage("real_import", "import the real model (SmolLM2-135M-Instruct GGUF) with its own tokenizer",
          real.run_real_import, real.import_settings, pointer="nemo", keys=frozenset(real.IMPORT_KEYS),
          check=real.check_real_import),
    Stage("real_add_exits", "add exits to the real model", real.run_real_add_exits, real.add_settings,
          needs=("real_import",), pointer="nemo", keys=frozenset(real.ADD_KEYS), check=real.check_real_add_exits),
    Stage("real_data", "tuning data: the real model's own answers to chat prompts", real.run_real_data,
          real.data_settings, needs=("real_import",), keys=frozenset(real.DATA_KEYS), check=real.check_real_data),
    Stage("real_ee_tune", "EE-Tuning the real model (backbone frozen)", real.run_real_ee_tune, real.tune_settings,
          needs=("real_add_exits",), wants=("real_data",), pointer="nemo", keys=None, check=real.check_real_ee_tune),
    Stage("real_calibrate", "calibrate the real model's exits on chat prompts", real.run_real_calibrate,
          real.calibrate_settings, needs=("real_ee_tune",), keys=frozenset(real.CALIBRATE_KEYS),
          check=real.check_real_calibrate),
    Stage("real_sweep", "the real model: threshold sweep, self-speculative drafts, chat samples", real.run_real_sweep,
          real.sweep_settings, needs=("real_calibrate",), keys=frozenset(real.SWEEP_KEYS), check=real.check_real_sweep),
    Stage("triton", "serve the calibrated EE-tuned model on Triton and query it", run_triton, triton_settings,
          wants=("calibrate", "real_calibrate"), needs_any=True, keys=frozenset(TRITON_KEYS), check=check_triton),
    Stage("benchmarks", "every scripts/bench_*.py with short settings", run_benchmarks, bench_settings,
          wants=("pretrain_ee", "ee_tune", "calibrate", "real_import", "real_calibrate"), keys=BENCH_KEYS,
          check=check_benchmarks),
]


