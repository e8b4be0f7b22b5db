"""The Triton Python backend of an early-exit model: request validation, the decode loop, responses.

Three layers, so that everything but the last is testable without Triton:

- :func:`~nemo_ee.deploy.triton.requests.parse_request` (``requests.py``): a request's input tensors (numpy arrays by name) -> a validated :class:`Job`, or a
  :class:`BadRequest` whose message names the bad value and the allowed range;
- :class:`~nemo_ee.deploy.triton.service.DecodeService` (``service.py``): one background thread owning the model. Requests are queued from any thread and
  join the running batch of :class:`~nemo_ee.inference.scheduler.ContinuousBatcher` at the next token
  boundary; finished ones leave it (their cache row is reused). Each sequence keeps its own exit rule,
  sampling settings and exit decisions, so it generates exactly what it would generate alone.
  ``self_speculative`` requests share the batch as well: each step a row either drafts or verifies, and a
  verify step makes several of its tokens final at once (streamed one response per token). Responses are sent by the
  service's :class:`~nemo_ee.deploy.triton.service.Responder` thread, so decoding never waits for Triton's
  response round trip, and it polls the requests' cancellation flags;
- :class:`TritonBackend` (here): what the repository's ``model.py`` delegates to. ``triton_python_backend_utils``
  (``pb_utils``) exists only inside Triton's Python stub, so model.py passes it in.

Responses (decoupled transaction policy): with ``stream`` one response per token, the last one flagged
final; otherwise one final response. A bad request gets one final error response and the server keeps
serving.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from nemo_ee.deploy.triton.interface import INPUTS
from nemo_ee.deploy.triton.requests import BadRequest, Job, ServingSettings, parse_request  # noqa: F401 (re-exported)
from nemo_ee.deploy.triton.service import DecodeService, Update  # noqa: F401 (re-exported)

log = logging.getLogger("nemo_ee.deploy.triton")


def add_python_path(entries: str) -> None:
    """Put the existing directories of ``entries`` (':'-separated) first on sys.path, in order."""
    for entry in reversed([e for e in entries.split(os.pathsep) if e]):
        if os.path.isdir(entry) and entry not in sys.path:
            sys.path.insert(0, entry)


def config_parameters(model_config: Mapping[str, Any]) -> dict:
    """config.pbtxt ``parameters`` as {key: string_value}."""
    return {k: str(v.get("string_value", "")) for k, v in (model_config.get("parameters") or {}).items()}


def resolve_checkpoint(checkpoint: str, model_repository: str, model_version: str) -> Path:
    """The checkpoint parameter: absolute, or relative to the model's version directory (then its model dir)."""
    if not checkpoint:
        raise ValueError("config.pbtxt has no 'checkpoint' parameter (the .nemo to serve)")
    path = Path(checkpoint)
    if path.is_absolute():
        return path
    for base in (Path(model_repository) / str(model_version), Path(model_repository)):
        if (base / path).exists():
            return base / path
    return Path(model_repository) / str(model_version) / path


def ensure_utf8_locale() -> str:
    """Make text files open as UTF-8 by default; returns the locale encoding now in force.

    Triton's stub embeds Python without reading the locale from the environment, so the interpreter starts in
    the C locale and ``open()`` decodes ASCII (torch's imports then fail on a UTF-8 template). ``open()``
    asks the C library at each call, so setting LC_CTYPE here, before torch is imported, is enough.
    """
    import locale

    for name in ("", "C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue
        if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
            break
    return locale.getpreferredencoding(False)


class TritonBackend:
    """The logic of the repository's ``model.py`` (a TritonPythonModel); ``pb_utils`` is passed in."""

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils
        self.service: Optional[DecodeService] = None

    def initialize(self, args: Mapping[str, str]) -> None:
        started = time.perf_counter()
        config = json.loads(args["model_config"])
        parameters = config_parameters(config)
        if not (config.get("model_transaction_policy") or {}).get("decoupled"):
            raise ValueError("config.pbtxt must set model_transaction_policy { decoupled: True } (responses stream)")
        path = resolve_checkpoint(parameters.get("checkpoint", ""), args["model_repository"], args["model_version"])
        if not path.is_file():  # before the slow imports: a wrong path fails in a second
            raise FileNotFoundError(f"no .nemo file at {path} (config.pbtxt parameter checkpoint)")
        ensure_utf8_locale()
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
        import torch

        from nemo_ee.inference.loading import inference_defaults, load_nemo_for_inference

        nemo = load_nemo_for_inference(path)
        self.model, self.tokenizer = nemo.model, nemo.tokenizer
        self.settings = ServingSettings.from_parameters(parameters, self.model, inference_defaults(nemo.cfg))
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        # The decode thread starts with the first request, not here: with a thread already running while the
        # stub answered the server's initialize call, the server occasionally never became ready (seen under load).
        self.service = DecodeService(self.model, self.tokenizer, self.settings.max_inflight)
        self.pb.Logger.log_info(
            f"nemo_ee: {path} loaded in {time.perf_counter() - started:.1f}s; defaults {self.settings.defaults}, "
            f"max_tokens_limit {self.settings.max_tokens_limit}, in-flight batch {self.settings.max_inflight}, "
            f"torch threads {torch.get_num_threads()}")

    def read_inputs(self, request: Any) -> dict:
        """Every known input of ``request`` as a numpy array, copied: Triton frees them after execute returns."""
        out = {}
        for spec in INPUTS:
            tensor = self.pb.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                out[spec.name] = np.array(tensor.as_numpy(), copy=True)
        return out

    def execute(self, requests: Sequence[Any]) -> None:
        if not self.service.running:
            self.service.start()
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = parse_request(self.read_inputs(request), self.tokenizer, self.model, self.settings)
            except BadRequest as err:
                self._send(sender, Update([], [], error=str(err)))
                continue
            except Exception as err:  # never let one request take the stub down
                log.exception("could not read a request")
                self._send(sender, Update([], [], error=f"internal error reading the request: {err}"))
                continue
            cancelled = getattr(request, "is_cancelled", None)
            self.service.submit(job, lambda update, s=sender: self._send(s, update), cancelled)
        return None

    def _send(self, sender: Any, update: Update) -> None:
        pb = self.pb
        if update.error is not None:
            sender.send(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(update.error)),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        tensors = [
            pb.Tensor("text_output", np.array([[update.text.encode("utf-8")]], dtype=np.object_)),
            pb.Tensor("output_ids", np.array([update.token_ids], dtype=np.int32)),
            pb.Tensor("exit_layers", np.array([update.exit_layers], dtype=np.int32)),
        ]
        if update.finished:  # the reason only comes with the last response (one tensor less per streamed token)
            tensors.append(pb.Tensor("finish_reason", np.array([[update.finish_reason.encode("utf-8")]], dtype=np.object_)))
        sender.send(pb.InferenceResponse(output_tensors=tensors),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if update.finished else 0)

    def finalize(self) -> None:
        if self.service is not None:
            self.service.stop()
            log.info("decode loop stopped: %s", dict(self.service.stats))
            self.service = None
