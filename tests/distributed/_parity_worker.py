"""Parity worker: runs a list of jobs in one process (single, or one rank under torchrun).

    python _parity_worker.py JOBS.json                      # a world of one (TP=PP=DP=1)
    python -m torch.distributed.run --nproc_per_node 2 _parity_worker.py JOBS.json

``JOBS.json`` is a list of jobs; each names its layout (``tp``, ``pp``; DP = world / (tp * pp)), the
EarlyExitConfig (``cfg``, a dict without the layout) and its files. Model-parallel state is
re-created between jobs whose layouts differ, so one launch covers TP=2, PP=2 and DP=2. Kinds:

- ``init``:   build the model from ``seed`` and save it to ``ckpt``.
- ``train``:  load ``init_ckpt``; ONE training step on a fixed global batch (each DP rank takes its
              slice, micro-batches of ``micro_batch_size``) through megatron's schedule and Adam;
              save to ``out_ckpt`` (with the optimizer if ``save_optimizer``); rank 0 writes ``losses`` (final + per-exit losses, grad norm).
- ``logits``: load ``ckpt``; eval forward of a fixed batch through the pipeline; every rank with
              TP rank 0 and DP rank 0 saves its (vocab-gathered) final/exit logits to ``out.rank<R>.pt``.
- ``dump``:   (world of one) load ``ckpt`` into a TP=1/PP=1 model (and megatron Adam with ``optimizer``);
              torch.save its parameters (and Adam moments by parameter name) to ``out``.
- ``mismatch``: load ``ckpt`` into a model it does not fit; rank 0 writes the error to ``out`` (JSON).
"""
import json
import os
import sys

import torch

GLOBAL_BATCH = 8
SEED_DATA = 1234
SEED_EVAL = 4321


def _config(job):
    from nemo_ee.config import EarlyExitConfig

    values = dict(job["cfg"], tensor_model_parallel_size=job.get("tp", 1), pipeline_model_parallel_size=job.get("pp", 1))
    return EarlyExitConfig.from_dict(values)


def _setup(cfg, seed):
    from nemo_ee.parallel.initialize import initialize_distributed

    kwargs = {"embedding_stages": cfg.embedding_stages} if hasattr(cfg, "embedding_stages") else {}
    initialize_distributed(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed, **kwargs)


def _build(job, seed=0):
    from nemo_ee.models import build_model

    cfg = _config(job)
    _setup(cfg, seed)
    return cfg, build_model(cfg)


def _batch(cfg, size, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (size, cfg.seq_length + 1), generator=g)
    mask = (torch.rand(size, cfg.seq_length, generator=g) > 0.25).float()
    mask[:, 0] = 1.0  # every micro-batch keeps some tokens
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "position_ids": torch.arange(cfg.seq_length).expand(size, cfg.seq_length).contiguous(),
    }


def job_init(job):
    from nemo_ee.checkpoint.dist import save_model

    _, model = _build(job, seed=job["seed"])
    if job.get("slow_fsync"):
        # Test instrumentation: hold the save after its data file is written, before it completes,
        # so the test can SIGKILL it mid-way deterministically (a kill anywhere before the final
        # rename is equivalent: the previous checkpoint is untouched until then).
        import time

        os.fsync = lambda fd: time.sleep(600)
    save_model(model, job["ckpt"])


def job_train(job):
    from megatron.core import parallel_state

    from nemo_ee.checkpoint.dist import load_model, save_model
    from nemo_ee.models.losses import ExitWeightSchedule
    from nemo_ee.parallel.optimizer import OptimSettings, build_optimizer, wrap_ddp
    from nemo_ee.parallel.schedules import ExitLossRecorder, run_forward_backward, split_microbatches

    cfg, model = _build(job)
    load_model(model, job["init_ckpt"])
    ddp = wrap_ddp(model)
    # adam_eps well above fp32 noise: Adam's first step g / (|g| + eps) turns rounding noise of near-zero
    # gradients (e.g. the key bias, whose exact gradient is 0) into lr-sized updates when eps is ~1e-8,
    # and with eps > 0 the update also depends on the gradient's scale, which the parity test then checks.
    settings = OptimSettings(lr=1e-2, min_lr=0.0, decay_style="constant", weight_decay=0.01, adam_eps=1e-4,
                             clip_grad=job.get("clip_grad", 1.0))
    opt = build_optimizer(ddp, settings, max_steps=1)

    batch = _batch(cfg, GLOBAL_BATCH, SEED_DATA)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // dp
    local = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()}
    microbatches = split_microbatches(local, job.get("micro_batch_size", 2))

    recorder = ExitLossRecorder(cfg.num_exits)
    weights = ExitWeightSchedule.from_config(cfg).weights(0)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    model.train()
    run_forward_backward([ddp], microbatches, weights, recorder, ddp.config, cfg.seq_length)
    losses = recorder.reduce()
    opt.step()
    save_model(model, job["out_ckpt"], optimizer=opt if job.get("save_optimizer") else None)
    if torch.distributed.get_rank() == 0:
        result = {"losses": losses, "grad_norm": opt.last_grad_norm, "step_ok": opt.last_step_ok,
                  "num_microbatches": len(microbatches), "dp": dp}
        with open(job["losses"], "w") as f:
            json.dump(result, f)


def job_logits(job):
    from megatron.core import parallel_state

    from nemo_ee.checkpoint.dist import load_model

    cfg, model = _build(job)
    load_model(model, job["ckpt"])
    model.eval()
    batch = _batch(cfg, 2, SEED_EVAL)
    with torch.no_grad():
        if not model.pre_process:
            hidden = torch.empty(cfg.seq_length, 2, cfg.hidden_size, dtype=torch.float32)
            torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
        if not model.post_process:
            torch.distributed.send(out.output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    result = {f"exit{i}": t.clone() for i, t in out.exits.items()}
    if model.post_process:
        result["final"] = out.output.clone()
    if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
        torch.save(result, f"{job['out']}.rank{torch.distributed.get_rank()}.pt")


def _adam_state(model, opt):
    """name -> {exp_avg, exp_avg_sq} of every parameter, from the torch optimizers inside megatron's."""
    inner = getattr(opt.optimizer, "chained_optimizers", [opt.optimizer])
    states = {}
    for name, param in model.named_parameters():
        for o in inner:
            if param in o.optimizer.state:
                st = o.optimizer.state[param]
                states[name] = {k: st[k].detach().clone() for k in ("exp_avg", "exp_avg_sq")}
    return states


def job_dump(job):
    """Load ``ckpt`` into a TP=1/PP=1 model (and Adam, with ``optimizer``); save parameters (and states)."""
    from nemo_ee.checkpoint.dist import load_model
    from nemo_ee.parallel.optimizer import OptimSettings, build_optimizer, wrap_ddp

    assert not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1
    _, model = _build(dict(job, tp=1, pp=1), seed=99)
    opt = None
    if job.get("optimizer"):
        opt = build_optimizer(wrap_ddp(model), OptimSettings(lr=1e-2, min_lr=0.0, decay_style="constant"), 1)
    load_model(model, job["ckpt"], optimizer=opt)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    torch.save({"params": state, "adam": _adam_state(model, opt) if opt else None}, job["out"])


def job_mismatch(job):
    """Load ``ckpt`` into a model it does not fit; write the error's type and message to ``out``."""
    from nemo_ee.checkpoint.dist import load_model

    _, model = _build(job, seed=99)
    try:
        load_model(model, job["ckpt"])
        error = None
    except Exception as exc:  # the test checks the type and message
        error = {"type": type(exc).__name__, "message": str(exc)}
    if torch.distributed.get_rank() == 0:
        with open(job["out"], "w") as f:
            json.dump(error, f)


JOBS = {"init": job_init, "train": job_train, "logits": job_logits, "dump": job_dump, "mismatch": job_mismatch}


def main(path):
    import nemo_ee.models  # noqa: F401  (CPU shim before megatron runs)

    with open(path) as f:
        jobs = json.load(f)
    for job in jobs:
        try:
            JOBS[job["kind"]](job)
        except Exception as exc:
            raise RuntimeError(f"job {job.get('name', job['kind'])} failed: {exc}") from exc
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
