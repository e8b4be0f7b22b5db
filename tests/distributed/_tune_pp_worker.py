"""EE-Tuning worker: runs a list of jobs in one process (a world of one, or one rank under torchrun).

    python _tune_pp_worker.py JOBS.json
    python -m torch.distributed.run --nproc_per_node 2 _tune_pp_worker.py JOBS.json

Kinds:
- ``init``: build the full model of ``cfg`` at ``pp`` stages from ``seed``; save a dist checkpoint to ``ckpt``.
- ``ref``:  (world of one) load ``ckpt`` into the full TP=PP=1 model; ``STEPS`` steps of the TP=PP=1 EETuner,
            one batch of ``GLOBAL_BATCH``; write ``out``.exits.safetensors and ``out``.json (losses per step).
- ``tune``: the pipeline tuner at ``pp`` stages (world = pp) from ``ckpt``: ``STEPS`` steps of the same
            batches split into ``microbatches``; rank 0 writes the gathered exits and a JSON report (per-step
            losses; per rank: loaded tensor names, opened checkpoint files, trainable?, backbone unchanged?).
"""
import json
import sys
from pathlib import Path

import torch

STEPS = 5
GLOBAL_BATCH = 4
LR = 1e-2


def _config(cfg, pp=1):
    from nemo_ee.config import EarlyExitConfig

    return EarlyExitConfig.from_dict(dict(cfg, pipeline_model_parallel_size=pp))


def _batch(cfg, step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_length), generator=g)
    mask = (torch.rand(GLOBAL_BATCH, cfg.seq_length, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    return {"tokens": tokens, "labels": (tokens + 1) % cfg.vocab_size, "loss_mask": mask,
            "position_ids": torch.arange(cfg.seq_length).expand(GLOBAL_BATCH, cfg.seq_length).contiguous()}


def _save_exits(state, out):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, f"{out}.exits.safetensors")


def job_init(job):
    from nemo_ee.checkpoint.dist import save_model
    from nemo_ee.models import build_model
    from nemo_ee.parallel.initialize import initialize_distributed

    cfg = _config(job["cfg"], job["pp"])
    initialize_distributed(1, cfg.pipeline_model_parallel_size, job["seed"], embedding_stages=cfg.embedding_stages)
    save_model(build_model(cfg), job["ckpt"])


def job_ref(job):
    from nemo_ee.checkpoint.dist import load_model
    from nemo_ee.models import build_model
    from nemo_ee.parallel.initialize import initialize_distributed
    from nemo_ee.tuning.ee_tune import EETuner

    cfg = _config(job["cfg"])
    initialize_distributed(1, 1, 0)
    model = build_model(cfg)
    load_model(model, job["ckpt"])
    tuner = EETuner(model, lr=LR, clip_grad=1.0)
    losses = []
    for step in range(STEPS):
        b = _batch(cfg, step)
        losses.append(tuner.step(b["tokens"], b["labels"], b["loss_mask"], b["position_ids"]))
    _save_exits({k: v for k, v in model.state_dict().items() if k.startswith("exits.") and torch.is_tensor(v)},
                job["out"])
    Path(f"{job['out']}.json").write_text(json.dumps({"losses": losses}))


def job_tune(job):
    import torch.distributed as dist
    from torch.distributed.checkpoint import filesystem

    from nemo_ee.parallel.schedules import split_microbatches
    from nemo_ee.tuning.pipeline import (
        PipelineEETuner, build_tuning_stage, gather_exit_state, init_tuning_parallel, load_stage_from_dist,
        tuning_config,
    )

    full = _config(job["cfg"])
    tcfg = tuning_config(full, job["pp"])
    init_tuning_parallel(tcfg, seed=0)
    model = build_tuning_stage(tcfg)
    opened = []
    original = filesystem.FileSystem.create_stream

    def spy(self, path, mode):
        opened.append(Path(path).name)
        return original(self, path, mode)

    filesystem.FileSystem.create_stream = spy
    try:
        names = load_stage_from_dist(model, job["ckpt"])
    finally:
        filesystem.FileSystem.create_stream = original
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("exits.") and torch.is_tensor(v)}
    tuner = PipelineEETuner(model, lr=LR, clip_grad=1.0)
    # every message megatron's schedule exchanges goes through P2PCommunicator._communicate: count them by direction
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    messages = {"send_next": 0, "recv_prev": 0, "send_prev": 0, "recv_next": 0}
    communicate = P2PCommunicator._communicate

    def counting(self, **kw):
        messages["send_next"] += kw["tensor_send_next"] is not None
        messages["send_prev"] += kw["tensor_send_prev"] is not None
        messages["recv_prev"] += bool(kw["recv_prev"])
        messages["recv_next"] += bool(kw["recv_next"])
        return communicate(self, **kw)

    P2PCommunicator._communicate = counting
    losses = []
    try:
        for step in range(STEPS):
            batch = _batch(full, step)
            losses.append(tuner.step(split_microbatches(batch, GLOBAL_BATCH // job["microbatches"])))
    finally:
        P2PCommunicator._communicate = communicate
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("exits.") and torch.is_tensor(v)}
    unchanged = after.keys() == backbone.keys() and all(torch.equal(after[k], backbone[k]) for k in backbone)
    no_grad = all(not p.requires_grad and p.grad is None
                  for n, p in model.named_parameters() if not n.startswith("exits."))
    rank_info = {"messages": messages, "names": names, "opened": sorted(set(opened)), "has_trainable": tuner.has_trainable,
                 "backbone_unchanged": unchanged, "backbone_no_grad": no_grad, "layers": len(model.decoder.layers),
                 "exits": model.local_exit_indices, "has_output_layer": getattr(model, "output_layer", None) is not None,
                 "has_final_norm": getattr(model.decoder, "final_layernorm", None) is not None}
    world = dist.get_world_size()
    infos = [None] * world
    dist.all_gather_object(infos, rank_info)
    exits = gather_exit_state(model)
    if dist.get_rank() == 0:
        _save_exits(exits, job["out"])
        Path(f"{job['out']}.json").write_text(json.dumps({"losses": losses, "ranks": infos}))


def main():
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        globals()[f"job_{job['kind']}"](job)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    import nemo_ee.models  # noqa: F401  (CPU shim before megatron runs)

    main()
