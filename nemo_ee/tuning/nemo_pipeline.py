"""EE-Tuning of a .nemo under pipeline parallelism (``torchrun --nproc_per_node PP scripts/ee_tune.py ...``).

Every rank reads the .nemo's config and tokenizer, and from its safetensors weights only the tensors of its
stage of the tuning model (embedding on the first stage, its layers, its exits; nothing after the last exit).
After tuning, the exit tensors are gathered on rank 0, which writes the output .nemo: the same archive with
the exit tensors replaced and every other tensor copied from the input, so the backbone is bit-identical.
"""
from __future__ import annotations

import copy
import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch
import torch.distributed as dist
from nemo_ee.atomic import atomic_path


WEIGHTS = "model_weights.safetensors"  # SafetensorsSaveRestoreConnector's weights file inside a .nemo
PREFIX = "model."  # the EarlyExitGPTModel's place in the NeMo model's state dict
CONFIG = "model_config.yaml"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def extract_nemo(path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike]) -> Path:
    """Unpack a .nemo (a tar archive) into ``out_dir``; checks it holds our config and safetensors weights."""
    out = Path(out_dir)
    with tarfile.open(str(path), "r:*") as tar:
        tar.extractall(out, filter="data")
    for name in (CONFIG, WEIGHTS):
        if not (out / name).is_file():
            raise ValueError(f"{path} has no {name}: not a .nemo written by nemo_ee")
    return out


def write_nemo_with_exits(src: Union[str, os.PathLike], dst: Union[str, os.PathLike],
                          exits: Mapping[str, torch.Tensor]) -> Path:
    """Copy the .nemo ``src`` to ``dst`` with its exit tensors replaced by ``exits`` (all other bytes kept).

    ``exits``: ``{"exits.I....": tensor}`` (the EarlyExitGPTModel's names), exactly the source's exit tensors with
    the same shapes and dtypes. Atomic (temp + rename).
    """
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    dst = Path(dst)
    with tarfile.open(str(src), "r:*") as tar_in:
        members = tar_in.getmembers()
        weights = [m for m in members if Path(m.name).name == WEIGHTS and m.isfile()]
        if len(weights) != 1:
            raise ValueError(f"{src} holds {len(weights)} {WEIGHTS} files, expected 1")
        state = load_bytes(tar_in.extractfile(weights[0]).read())
        exits = {PREFIX + k: v for k, v in exits.items()}
        expected = {k for k in state if k.startswith(PREFIX + "exits.")}
        if expected != set(exits):
            raise KeyError(f"tuned exits do not match {src}: missing {sorted(expected - set(exits))[:5]}, "
                           f"unknown {sorted(set(exits) - expected)[:5]}")
        for key, value in exits.items():
            if value.shape != state[key].shape or value.dtype != state[key].dtype:
                raise ValueError(f"{key}: tuned {tuple(value.shape)} {value.dtype}, "
                                 f"source {tuple(state[key].shape)} {state[key].dtype}")
            state[key] = value.detach().cpu().contiguous()
        blob = save_bytes(state)
        with atomic_path(dst) as tmp:
            with tarfile.open(str(tmp), "w:") as tar_out:
                for member in members:
                    if member is weights[0]:
                        info = copy.copy(member)
                        info.size = len(blob)
                        tar_out.addfile(info, io.BytesIO(blob))
                    else:
                        tar_out.addfile(member, tar_in.extractfile(member) if member.isfile() else None)
    return dst


def tune_nemo_pipeline(cfg: Any) -> dict:
    """EE-Tuning of ``cfg.restore_from`` (.nemo, TP=PP=1) at ``cfg.pipeline_model_parallel_size`` stages.

    Collective: one process per stage (torchrun). A step is ``num_microbatches`` micro-batches of
    ``micro_batch_size`` samples (the same samples as ``micro_batch_size * num_microbatches`` at PP=1) of
    ``seq_length`` tokens (null: the model's). ``loss`` must be ``ce`` (kl needs the final layer, which the tuning
    model does not have; :func:`nemo_ee.tuning.ee_tune.check_tuning_settings` refuses it at PP > 1).
    Returns what :func:`nemo_ee.tuning.ee_tune.tune_nemo` returns, on every rank.
    """
    from omegaconf import OmegaConf

    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.data import load_tokenizer
    from nemo_ee.tuning.data import tuning_dataset
    from nemo_ee.models.nemo_model import _arch_dict
    from nemo_ee.parallel.schedules import split_microbatches
    from nemo_ee.tuning.ee_tune import (
        batch_order, check_tuning_settings, format_losses, log_line, loss_label, nemo_seq_length, progress, step_batch,
        step_line, tuning_seq_length,
    )
    from nemo_ee.tuning.pipeline import (
        PipelineEETuner, build_tuning_stage, gather_exit_state, init_tuning_parallel, load_stage_from_safetensors,
        tuning_config,
    )

    loss, temperature = check_tuning_settings(cfg)  # loss=kl is refused here at PP > 1
    if loss != "ce":  # (and at PP=1, where this tuner's model would still end at the last exit)
        raise ValueError(f"loss={loss!r} needs the final layer, which the pipeline tuner does not build; "
                         "use loss=ce, or tune_nemo at pipeline_model_parallel_size=1")
    src, dst = Path(str(cfg.restore_from)), Path(str(cfg.output))
    pp, nmb = cfg.get("pipeline_model_parallel_size", 1), cfg.get("num_microbatches", 1)
    for name, value in (("pipeline_model_parallel_size", pp), ("num_microbatches", nmb)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if str(cfg.get("optimizer", "torch")) != "torch":
        raise ValueError(f"optimizer={cfg.optimizer!r}: with pipeline_model_parallel_size > 1 only 'torch' "
                         "(AdamW over each stage's exit parameters) is supported")
    if dst.suffix != ".nemo":
        raise ValueError(f"output={dst} must end in .nemo")
    if dst.exists() and not bool(cfg.get("overwrite", False)):
        raise FileExistsError(f"output={dst} exists; set overwrite=true to replace it")
    if not src.is_file():
        raise FileNotFoundError(f"no .nemo file at restore_from={src}")
    seq_length = tuning_seq_length(cfg.get("seq_length"), nemo_seq_length(src))
    with tempfile.TemporaryDirectory(prefix="ee_tune_") as tmp:
        folder = extract_nemo(src, tmp)
        model_cfg = OmegaConf.load(folder / CONFIG)
        ee = EarlyExitConfig.from_dict(_arch_dict(model_cfg))
        if ee.tensor_model_parallel_size * ee.pipeline_model_parallel_size > 1:
            raise ValueError(f"{src} was saved at TP={ee.tensor_model_parallel_size} PP={ee.pipeline_model_parallel_size}; "
                             "a .nemo holds a TP=PP=1 model")
        tcfg = tuning_config(ee, pp)
        init_tuning_parallel(tcfg, int(cfg.seed))
        model = build_tuning_stage(tcfg)
        load_stage_from_safetensors(model, folder / WEIGHTS, prefix=PREFIX)
        def artifact(entry: Any) -> Any:  # a "nemo:<name>" artifact lies in the extracted archive
            return None if not entry else (folder / str(entry)[len("nemo:"):] if str(entry).startswith("nemo:")
                                           else str(entry))

        # the model's own tokenizer, as EarlyExitGPTNeMoModel loads it (an imported model's HF tokenizer included)
        tokenizer = load_tokenizer(artifact(model_cfg.tokenizer.tokenizer_file),
                                   artifact(model_cfg.tokenizer.get("hf_tokenizer_file")))
        for turn in (0, 1):  # rank 0 tokenizes (and caches) the corpus first; the others then read the cache
            if (_rank() == 0) == (turn == 0):
                train_ds = tuning_dataset(cfg, model_cfg, tokenizer, seq_length, ee.vocab_size)
            _barrier()
        optim = cfg.optim
        tuner = PipelineEETuner(model, lr=float(optim.lr), weight_decay=float(optim.weight_decay),
                                clip_grad=float(optim.clip_grad))
        mbs, steps = int(cfg.micro_batch_size), int(cfg.max_steps)
        every = max(1, int(cfg.get("log_every_n_steps", 10)))
        order = batch_order(len(train_ds), int(cfg.seed))
        label = loss_label(loss, temperature)
        first = last = {}
        with progress(steps, label, enabled=_rank() == 0) as bar:
            for step in range(steps):
                last = tuner.step(split_microbatches(step_batch(train_ds, order, step, mbs * nmb), mbs))
                first = first or last
                bar.set_postfix_str(format_losses(ee, last), refresh=False)
                bar.update(1)
                if _rank() == 0 and (step % every == 0 or step == steps - 1):
                    log_line(step_line(step, steps, ee, last, label))
        exits = gather_exit_state(model, dst=0)
        error = None
        if _rank() == 0:
            try:
                write_nemo_with_exits(src, dst, exits)
                print(f"wrote {dst}")
            except Exception as exc:  # tell the other ranks instead of leaving them in a collective
                error = f"{type(exc).__name__}: {exc}"
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise RuntimeError(f"writing {dst} failed on rank 0: {error}")
    return {"first": first, "last": last, "steps": steps, "output": str(dst), "loss": loss, "seq_length": seq_length}
