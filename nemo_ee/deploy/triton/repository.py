"""Write a Triton model repository that serves an early-exit .nemo with nemo_ee's Python backend.

Layout (``write_repository(nemo, DIR, name="ee_gpt")``)::

    DIR/ee_gpt/config.pbtxt      backend "python", decoupled (streaming), one CPU instance, parameters
    DIR/ee_gpt/1/model.py        a thin TritonPythonModel: nemo_ee.deploy.triton.backend.TritonBackend
    DIR/ee_gpt/1/model.nemo      the checkpoint (copied; or referenced by absolute path with copy=False)

config.pbtxt parameters (see :data:`nemo_ee.deploy.triton.interface.PARAMETERS`): ``checkpoint``, the
default ``exit_policy`` / ``exit_thresholds`` / ``early_exit_threshold`` (the .nemo's calibrated
``inference`` section unless overridden), ``decode_mode``, ``max_inflight`` (in-flight batch),
``max_tokens_limit``, ``num_threads`` and ``python_path``. Edit them and restart the server to change the
defaults; a request's own inputs override them.

Serving here: ``python scripts/serve_triton.py --repository DIR`` (the ``tritonserver`` of the
nvidia-pytriton wheel, see :mod:`nemo_ee.deploy.triton.server`).

Serving with an NGC Triton container on a GPU machine (NOT tested in this project: no Docker and no GPU on
its machines; what follows is what the repository needs, checked only against the 2.51 server here).
The nvidia-pytriton 0.7.0 wheel bundles Triton 2.51.0, which is the ``24.10`` NGC release. The container's
Python backend stub is built for the container's own Python (3.10 in 24.10), so nemo_ee and its
dependencies must be installed into that Python; the ``python_path`` parameter written here names this
machine's venv and is skipped when those directories do not exist. Export with the checkpoint copied (the
default) so the repository is self-contained, then::

    docker run --rm --shm-size=1g -p8000:8000 -p8001:8001 -e CUDA_VISIBLE_DEVICES= \\
        -v $PWD/triton_repo:/models -v $PWD:/opt/nemo_ee \\
        nvcr.io/nvidia/tritonserver:24.10-py3 bash -c \\
        "pip install torch==2.13.0 && pip install /opt/nemo_ee && \\
         tritonserver --model-repository=/models --disable-auto-complete-config"

or bake the install into a custom image (``FROM nvcr.io/nvidia/tritonserver:24.10-py3``, ``COPY . /opt/nemo_ee``,
``RUN pip install torch==2.13.0 && pip install /opt/nemo_ee``) and run ``tritonserver --model-repository=/models``
in it. ``--shm-size`` matters: the Python backend exchanges tensors through /dev/shm (Docker's default is 64 MB).
What runs where: ``load_nemo_for_inference`` restores the model onto the CPU (NeMo's ``map_location="cpu"``)
and the backend decodes there; ``instance_group`` is ``KIND_CPU``. This CPU path is the one tested here. In a
container started with ``--gpus all``, CUDA is present, so nemo_ee's CPU shim for megatron-core stays off and
megatron-core builds its modules for CUDA before they are moved to the CPU; that mix is untested. Until it is,
start the container with ``-e CUDA_VISIBLE_DEVICES=`` (or without ``--gpus``): the backend then runs exactly
the tested CPU path. GPU decoding is prepared but not done: the decoder (nemo_ee.inference) puts its KV
cache, hidden-state buffers and indices on the model's device and samples on the CPU with each request's
seeded generator (checked by decoding under ``torch.set_default_device("meta")``, which gives the same
tokens only when no tensor is made without an explicit device); what is missing is loading the model onto
the GPU, then a run on one.
"""
from __future__ import annotations

import json
import re
import shutil
import site
import tarfile
from pathlib import Path
from typing import Any, Mapping, Optional

from nemo_ee.deploy.triton.interface import INPUTS, OUTPUTS, PARAMETERS

CHECKPOINT_NAME = "model.nemo"

MODEL_PY = '''"""Triton Python-backend entry point written by nemo_ee (scripts/export_triton.py).

The logic lives in nemo_ee.deploy.triton.backend; this file only makes nemo_ee importable (the stub does not
inherit PYTHONPATH: config.pbtxt's python_path parameter lists the directories to add) and delegates.
"""
import json
import os
import sys

import triton_python_backend_utils as pb_utils


def _add_python_path(args):
    parameters = json.loads(args["model_config"]).get("parameters", {})
    entries = parameters.get("python_path", {}).get("string_value", "")
    for entry in reversed([e for e in entries.split(os.pathsep) if e]):
        if os.path.isdir(entry) and entry not in sys.path:
            sys.path.insert(0, entry)


class TritonPythonModel:
    def initialize(self, args):
        _add_python_path(args)
        from nemo_ee.deploy.triton.backend import TritonBackend

        self.backend = TritonBackend(pb_utils)
        self.backend.initialize(args)

    def execute(self, requests):
        return self.backend.execute(requests)

    def finalize(self):
        self.backend.finalize()
'''


def nemo_inference_defaults(nemo: str | Path) -> dict:
    """The .nemo's calibrated decoding defaults (its config's ``inference`` section), without building the model."""
    from omegaconf import OmegaConf

    from nemo_ee.inference.loading import CONFIG, check_nemo_file, inference_defaults

    check_nemo_file(nemo)
    with tarfile.open(nemo) as tar:
        member = next(m for m in tar.getmembers() if Path(m.name).name == CONFIG)
        cfg = OmegaConf.create(tar.extractfile(member).read().decode("utf-8"))
    return inference_defaults(cfg)


def default_python_path() -> str:
    """This interpreter's site-packages and the directory holding the nemo_ee package, ':'-joined."""
    import nemo_ee

    entries = [p for p in site.getsitepackages() if Path(p).is_dir()]
    entries.append(str(Path(nemo_ee.__file__).resolve().parents[1]))
    return ":".join(dict.fromkeys(entries))


def _quote(value: str) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a protobuf text-format string literal (raw UTF-8)


def config_pbtxt(name: str, parameters: Mapping[str, str], instance_count: int = 1) -> str:
    """The text of config.pbtxt."""
    def tensors(specs: Any, is_input: bool) -> str:
        out = []
        for i, spec in enumerate(specs):
            dims = ", ".join(str(d) for d in spec.dims)
            optional = " optional: true" if is_input and spec.optional else ""
            comma = "," if i < len(specs) - 1 else ""
            out.append(f'  {{ name: "{spec.name}" data_type: {spec.config_type} dims: [ {dims} ]{optional} }}{comma}'
                       f"  # {spec.doc}")
        return "\n".join(out)

    lines = [
        "# Written by nemo_ee (scripts/export_triton.py): an early-exit LLM on nemo_ee's Python backend.",
        "# Inputs follow TensorRT-LLM's Triton names; see nemo_ee/deploy/triton/interface.py.",
        f"name: {_quote(name)}",
        'backend: "python"',
        "# One prompt per request (tensors carry a leading batch dimension of 1); concurrent requests are",
        "# batched in flight by the backend itself (parameter max_inflight).",
        "max_batch_size: 1",
        "model_transaction_policy { decoupled: True }  # streaming: one response per token when stream is true",
        "input [",
        tensors(INPUTS, True),
        "]",
        "output [",
        tensors(OUTPUTS, False),
        "]",
        "# One instance owns the model and its decode loop (the decoder runs on the CPU).",
        f"instance_group [ {{ count: {int(instance_count)} kind: KIND_CPU }} ]",
    ]
    for key, value in parameters.items():
        lines.append(f"# {key}: {PARAMETERS[key]}")
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def write_repository(
    nemo: str | Path,
    repository: str | Path,
    name: str = "ee_gpt",
    copy: bool = True,
    overwrite: bool = False,
    exit_policy: Optional[str] = None,
    threshold: Optional[float] = None,
    exit_thresholds: Optional[Mapping[int, float]] = None,
    decode_mode: Optional[str] = None,
    max_inflight: int = 8,
    max_tokens_limit: Optional[int] = None,
    num_threads: int = 0,
    instance_count: int = 1,
    python_path: Optional[str] = None,
) -> Path:
    """Write ``repository/name`` for the .nemo ``nemo``; returns the model directory.

    Defaults left None come from the .nemo's calibrated ``inference`` section (read now, also to fail
    early on a broken one); the values given here are validated and written to config.pbtxt.
    """
    from nemo_ee.inference.generate import DECODE_MODES
    from nemo_ee.inference.policies import POLICIES, check_threshold

    nemo = Path(nemo).resolve()
    calibrated = nemo_inference_defaults(nemo)  # also: a missing / broken .nemo fails here, before any write
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain directory name")
    if exit_policy is not None and exit_policy not in POLICIES:
        raise ValueError(f"exit_policy {exit_policy!r} is not one of {list(POLICIES)}")
    policy = exit_policy or calibrated.get("exit_policy", "max_prob")
    if threshold is not None:
        threshold = check_threshold(policy, threshold)
    table = {int(k): check_threshold(policy, v) for k, v in (exit_thresholds or {}).items()}
    if decode_mode is not None and decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode {decode_mode!r} is not one of {list(DECODE_MODES)}")
    if int(max_inflight) < 1:
        raise ValueError(f"max_inflight={max_inflight} must be >= 1")
    if max_tokens_limit is not None and int(max_tokens_limit) < 1:
        raise ValueError(f"max_tokens_limit={max_tokens_limit} must be >= 1")
    if int(num_threads) < 0:
        raise ValueError(f"num_threads={num_threads} must be >= 0 (0: torch's default)")
    if int(instance_count) < 1:
        raise ValueError(f"instance_count={instance_count} must be >= 1")
    same_policy = policy == calibrated.get("exit_policy", "max_prob")
    has_calibrated = bool(calibrated.get("exit_thresholds")) or calibrated.get("threshold") is not None
    if threshold is None and not table:
        if same_policy:
            threshold, table = calibrated.get("threshold"), dict(calibrated.get("exit_thresholds") or {})
        elif has_calibrated:
            raise ValueError(f"exit_policy {policy!r} needs a threshold: the .nemo's thresholds were calibrated "
                             f"for {calibrated.get('exit_policy')!r}")

    parameters = {
        "checkpoint": CHECKPOINT_NAME if copy else str(nemo),
        "python_path": default_python_path() if python_path is None else python_path,
        "exit_policy": policy,
        "early_exit_threshold": "" if threshold is None else repr(float(threshold)),
        "exit_thresholds": json.dumps({str(k): float(v) for k, v in sorted(table.items())}) if table else "",
        "decode_mode": decode_mode or calibrated.get("decode_mode", "early_exit"),
        "max_inflight": str(int(max_inflight)),
        "max_tokens_limit": "" if max_tokens_limit is None else str(int(max_tokens_limit)),
        "num_threads": str(int(num_threads)),
    }

    model_dir = Path(repository) / name
    if model_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{model_dir} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(model_dir)
    version = model_dir / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(MODEL_PY, encoding="utf-8")
    if copy:
        shutil.copyfile(nemo, version / CHECKPOINT_NAME)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, parameters, instance_count), encoding="utf-8")
    return model_dir


_PARAMETER = re.compile(r'^parameters \{ key: ("(?:[^"\\]|\\.)*") value: \{ string_value: ("(?:[^"\\]|\\.)*") \} \}$')


def read_parameters(model_dir: str | Path) -> dict:
    """The parameters of a config.pbtxt written by :func:`write_repository`, as {key: value}."""
    text = (Path(model_dir) / "config.pbtxt").read_text(encoding="utf-8")
    found = (_PARAMETER.match(line) for line in text.splitlines())
    return {json.loads(m.group(1)): json.loads(m.group(2)) for m in found if m}
