"""The Triton Python backend of an early-exit model: request validation, the decode loop, responses.

Three layers, so that everything but the last is testable without Triton:

- :func:`parse_request`: a request's input tensors (numpy arrays by name) -> a validated :class:`Job`, or a
  :class:`BadRequest` whose message names the bad value and the allowed range;
- :class:`DecodeService`: one background thread owning the model. Requests are queued from any thread and
  join the running batch of :class:`~nemo_ee.inference.scheduler.ContinuousBatcher` at the next token
  boundary; finished ones leave it (their cache row is reused). Each sequence keeps its own exit rule,
  sampling settings and exit decisions, so it generates exactly what it would generate alone.
  ``self_speculative`` requests cannot share a batch (one sequence drafts and verifies alone): they wait in
  a FIFO and the loop runs one of them to completion with
  :func:`~nemo_ee.inference.speculative.generate_self_speculative` between two steps of the batch. While it
  runs, the batch pauses; its tokens are sent when it ends (streamed one response per token, in a burst);
- :class:`TritonBackend`: what the repository's ``model.py`` delegates to. ``triton_python_backend_utils``
  (``pb_utils``) exists only inside Triton's Python stub, so model.py passes it in.

Responses (decoupled transaction policy): with ``stream`` one response per token, the last one flagged
final; otherwise one final response. A bad request gets one final error response and the server keeps
serving.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from nemo_ee.deploy.triton.interface import INPUTS

log = logging.getLogger("nemo_ee.deploy.triton")


class BadRequest(ValueError):
    """A request the model cannot serve; its message goes back to the client."""


# ---------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class ServingSettings:
    """The model's serving defaults: the .nemo's calibrated ``inference`` section, overridden by config.pbtxt."""

    defaults: dict            # GenerationParams fields (exit_policy, threshold / exit_thresholds, decode_mode)
    max_tokens_limit: int     # largest max_tokens a request may ask for
    context: int              # positions of the model (prompt + generated)
    max_inflight: int = 8     # sequences decoded together
    num_threads: int = 0      # torch intra-op threads (0: leave torch's default)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], model: Any,
                        model_defaults: Mapping[str, Any]) -> "ServingSettings":
        """``parameters``: config.pbtxt's ('' = unset); ``model_defaults``: ``inference_defaults(nemo.cfg)``."""
        from nemo_ee.inference.generate import DECODE_MODES, context_limit
        from nemo_ee.inference.policies import POLICIES, check_threshold

        def get(key: str) -> str:
            return str(parameters.get(key, "") or "").strip()

        defaults = dict(model_defaults)
        if get("exit_policy"):
            if get("exit_policy") not in POLICIES:
                raise ValueError(f"config parameter exit_policy {get('exit_policy')!r} is not one of {list(POLICIES)}")
            if get("exit_policy") != defaults.get("exit_policy", "max_prob"):
                defaults.pop("exit_thresholds", None)  # calibrated for another policy
                defaults.pop("threshold", None)
            defaults["exit_policy"] = get("exit_policy")
        policy = defaults.get("exit_policy", "max_prob")
        if get("exit_thresholds") or get("early_exit_threshold"):  # they replace the .nemo's thresholds
            defaults.pop("exit_thresholds", None)
            defaults.pop("threshold", None)
        if get("exit_thresholds"):
            try:
                table = json.loads(get("exit_thresholds"))
                defaults["exit_thresholds"] = {int(k): check_threshold(policy, v) for k, v in dict(table).items()}
            except (TypeError, ValueError, AttributeError) as err:
                raise ValueError(f"config parameter exit_thresholds {get('exit_thresholds')!r}: {err}") from None
        if get("early_exit_threshold"):
            defaults["threshold"] = check_threshold(policy, get("early_exit_threshold"))
        if get("decode_mode"):
            if get("decode_mode") not in DECODE_MODES:
                raise ValueError(f"config parameter decode_mode {get('decode_mode')!r} is not one of "
                                 f"{list(DECODE_MODES)}")
            defaults["decode_mode"] = get("decode_mode")
        context = context_limit(model)
        limit = int(get("max_tokens_limit") or context - 1)
        if not 1 <= limit <= context - 1:
            raise ValueError(f"config parameter max_tokens_limit={limit} is outside 1..{context - 1} "
                             f"(context {context})")
        inflight = int(get("max_inflight") or 8)
        if inflight < 1:
            raise ValueError(f"config parameter max_inflight={inflight} must be >= 1")
        threads = int(get("num_threads") or 0)
        if threads < 0:
            raise ValueError(f"config parameter num_threads={threads} must be >= 0")
        if defaults.get("exit_thresholds"):  # unknown exit layers are an error at load time, not per request
            from nemo_ee.inference.generate import GenerationParams

            GenerationParams(**defaults).rule(model.ee_config.exit_layer_nums)
        return cls(defaults, limit, context, inflight, threads)


# ---------------------------------------------------------------------------------------------- requests
@dataclasses.dataclass
class Job:
    """A validated request."""

    prompt_ids: list
    params: Any               # GenerationParams
    stream: bool = False


def _one(inputs: Mapping[str, Any], name: str) -> Any:
    """The single value of input ``name`` (None when absent)."""
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise BadRequest(f"{name} must hold one value per request, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequest(f"{name} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except TypeError:
        raise BadRequest(f"{name} must be BYTES (UTF-8 text), got {type(value).__name__}") from None


def _number(name: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    try:
        number = kind(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} {value!r} is not a number") from None
    if kind is float and not math.isfinite(number):
        raise BadRequest(f"{name}={number} must be a finite number")
    return number


def parse_request(inputs: Mapping[str, Any], tokenizer: Any, model: Any, settings: ServingSettings) -> Job:
    """Validate one request's inputs (``{name: numpy array}``) into a :class:`Job`, or raise :class:`BadRequest`."""
    from nemo_ee.inference.cli import stop_token_ids
    from nemo_ee.inference.generate import DECODE_MODES, GenerationParams, check_prompt
    from nemo_ee.inference.policies import POLICIES, check_threshold

    raw = inputs.get("text_input")
    if raw is None:
        raise BadRequest("text_input is missing: send the prompt as a BYTES tensor of shape [1, 1]")
    if np.asarray(raw).size == 0:
        raise BadRequest("text_input is empty: send one prompt (a BYTES tensor of shape [1, 1])")
    if np.asarray(raw).size > 1:
        raise BadRequest(f"text_input holds {np.asarray(raw).size} prompts; send one prompt per request "
                         "(concurrent requests are batched in flight by the server)")
    text = _text("text_input", _one(inputs, "text_input"))
    if not text:
        raise BadRequest("text_input is empty: the prompt needs at least one character")

    max_tokens = _number("max_tokens", _one(inputs, "max_tokens"), int)
    if max_tokens is None:
        raise BadRequest("max_tokens is missing: send an INT32 tensor of shape [1, 1]")
    if max_tokens < 1:
        raise BadRequest(f"max_tokens={max_tokens} must be >= 1")
    if max_tokens > settings.max_tokens_limit:
        raise BadRequest(f"max_tokens={max_tokens} is above this model's limit of {settings.max_tokens_limit} "
                         f"(context of {settings.context} positions)")

    defaults = settings.defaults
    policy_in = _one(inputs, "exit_policy")
    policy = _text("exit_policy", policy_in).strip() if policy_in is not None else None
    if policy is not None and policy not in POLICIES:
        raise BadRequest(f"exit_policy {policy!r} is not one of {list(POLICIES)}")
    mode_in = _one(inputs, "decode_mode")
    mode = _text("decode_mode", mode_in).strip() if mode_in is not None else None
    if mode is not None and mode not in DECODE_MODES:
        raise BadRequest(f"decode_mode {mode!r} is not one of {list(DECODE_MODES)}")
    threshold = _one(inputs, "early_exit_threshold")
    if threshold is not None:
        try:
            threshold = check_threshold(policy or defaults.get("exit_policy", "max_prob"), threshold)
        except ValueError as err:
            raise BadRequest(str(err)) from None
    calibrated = bool(defaults.get("exit_thresholds")) or defaults.get("threshold") is not None
    effective_mode = mode or defaults.get("decode_mode", "early_exit")
    if (threshold is None and calibrated and effective_mode == "early_exit"
            and policy not in (None, defaults.get("exit_policy", "max_prob"))):
        raise BadRequest(f"exit_policy {policy!r} needs an early_exit_threshold: this model's default thresholds "
                         f"are for {defaults.get('exit_policy', 'max_prob')!r}")

    kwargs = dict(defaults)
    if threshold is not None:
        kwargs.pop("exit_thresholds", None)
        kwargs["threshold"] = threshold
    for key, name, kind in (("temperature", "temperature", float), ("top_k", "top_k", int),
                            ("top_p", "top_p", float), ("seed", "random_seed", int),
                            ("num_draft", "num_draft_tokens", int), ("draft_exit", "draft_exit_layer", int)):
        value = _number(name, _one(inputs, name), kind)
        if value is not None:
            kwargs[key] = value
    if policy is not None:
        kwargs["exit_policy"] = policy
    if mode is not None:
        kwargs["decode_mode"] = mode

    end_id = _number("end_id", _one(inputs, "end_id"), int)
    vocab = int(model.ee_config.vocab_size)
    if end_id is not None and end_id != -1 and not 0 <= end_id < vocab:
        raise BadRequest(f"end_id={end_id} is outside the vocabulary 0..{vocab - 1} (-1: no end token)")
    words = inputs.get("stop_words")
    words = [] if words is None else [_text("stop_words", w) for w in np.asarray(words).reshape(-1)]
    try:
        stops = stop_token_ids(tokenizer, [w for w in words if w], stop_at_eos=end_id is None)
    except ValueError as err:
        raise BadRequest(str(err)) from None
    if end_id is not None and end_id != -1:
        stops = tuple(dict.fromkeys((end_id,) + stops))

    try:
        params = GenerationParams(max_tokens=max_tokens, stop_token_ids=stops, **kwargs)
        params.rule(model.ee_config.exit_layer_nums)
        if params.decode_mode == "self_speculative":
            from nemo_ee.inference.speculative import draft_exit_index

            draft_exit_index(model, params.draft_exit)
    except ValueError as err:
        message = str(err).replace("draft_exit=", "draft_exit_layer=").replace("num_draft=", "num_draft_tokens=")
        raise BadRequest(message) from None

    prompt = tokenizer.encode(text)
    try:
        check_prompt(prompt, model)
    except ValueError as err:
        raise BadRequest(str(err)) from None
    stream = _one(inputs, "stream")
    return Job(prompt, params, bool(stream) if stream is not None else False)


# ---------------------------------------------------------------------------------------------- decoding
@dataclasses.dataclass
class Update:
    """What one response carries: tokens with their exits and text, or an error."""

    token_ids: list
    exit_layers: list
    text: str = ""
    finished: bool = False
    finish_reason: str = ""
    error: Optional[str] = None


class _Live:
    """A request being decoded: its tokens so far and the text already streamed."""

    def __init__(self, job: Job, sink: Callable[[Update], None], cancelled: Optional[Callable[[], bool]]) -> None:
        self.job, self.sink, self.cancelled = job, sink, cancelled
        self.ids: list[int] = []
        self.exits: list[int] = []
        self.sent_text = ""

    def add(self, tokenizer: Any, token: int, depth: int, finished: bool, reason: str) -> Optional[Update]:
        """Record a token; returns the update to send (None: nothing to send yet)."""
        self.ids.append(int(token))
        self.exits.append(int(depth))
        if not self.job.stream:
            if not finished:
                return None
            return Update(list(self.ids), list(self.exits), tokenizer.decode(self.ids, skip_special_tokens=True),
                          True, reason)
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not finished:
            delta = ""  # an incomplete multi-byte character: its text comes with the token that completes it
        else:
            delta = text[len(self.sent_text):] if text.startswith(self.sent_text) else text
            self.sent_text = text
        return Update([int(token)], [int(depth)], delta, finished, reason if finished else "")


class DecodeService:
    """The decode loop: one thread owns the model; :meth:`submit` may be called from any thread.

    ``sink(update)`` is called from the loop thread, once per token when the job streams, else once at the
    end; the update with ``finished`` (or ``error``) is the last one for that job. A sink that raises is
    taken as a client that went away: its sequence leaves the batch.
    """

    CANCEL_CHECK_EVERY = 8  # steps between polls of the requests' cancellation flags

    def __init__(self, model: Any, tokenizer: Any, max_inflight: int = 8) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_inflight = int(max_inflight)
        self._inbox: "queue.Queue[tuple]" = queue.Queue()
        self._speculative: collections.deque = collections.deque()
        self._live: dict[int, _Live] = {}
        self._batcher = self._new_batcher()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stats = collections.Counter()  # steps, tokens, requests, speculative, max_rows, errors

    def _new_batcher(self) -> Any:
        from nemo_ee.inference.scheduler import ContinuousBatcher

        return ContinuousBatcher(self.model, self.max_inflight)

    # -------------------------------------------------------------------- public
    def start(self) -> "DecodeService":
        self._thread = threading.Thread(target=self._run, name="ee-decode-loop", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job, sink: Callable[[Update], None], cancelled: Optional[Callable[[], bool]] = None) -> None:
        """Queue ``job``; it joins the running batch at the next token boundary."""
        if self._stop.is_set():
            raise RuntimeError("the decode loop has stopped")
        self._inbox.put((job, sink, cancelled))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued or running get an error response."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        pending = list(self._live.values()) + [_Live(*item) for item in self._speculative]
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                pending.append(_Live(*item))
        for live in pending:
            self._deliver(live, Update([], [], error="the model is being unloaded; the request was not finished"))
        self._live.clear()
        self._speculative.clear()

    # -------------------------------------------------------------------- loop
    def _run(self) -> None:
        import torch

        with torch.no_grad():
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception as err:  # the loop must survive anything: fail the running jobs, go on
                    log.exception("decode loop error")
                    self._fail_all(f"internal error while decoding: {type(err).__name__}: {err}")

    def _iteration(self) -> None:
        idle = not self._batcher.busy and not self._speculative
        try:
            items = [self._inbox.get(timeout=0.5)] if idle else []
        except queue.Empty:
            return
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is not None:
                self._admit(*item)
        if self._batcher.busy:
            self._step()
        if self._speculative and not self._stop.is_set():
            self._run_speculative(self._speculative.popleft())

    def _admit(self, job: Job, sink: Callable, cancelled: Optional[Callable]) -> None:
        self.stats["requests"] += 1
        live = _Live(job, sink, cancelled)
        if job.params.decode_mode == "self_speculative":
            self._speculative.append((job, sink, cancelled))
            return
        try:
            rid = self._batcher.submit(job.prompt_ids, job.params)
        except ValueError as err:
            self._deliver(live, Update([], [], error=str(err)))
            return
        self._live[rid] = live

    def _step(self) -> None:
        rows = len(self._batcher.running) + min(len(self._batcher.waiting), len(self._batcher.free))
        events = self._batcher.step()
        self.stats["steps"] += 1
        if rows > self.stats["max_rows"]:
            self.stats["max_rows"] = rows
            log.info("in-flight batch: %d sequences decoded together (a new peak)", rows)
        for event in events:
            live = self._live.get(event.request_id)
            if live is None:
                continue
            self.stats["tokens"] += 1
            update = live.add(self.tokenizer, event.token, event.depth, event.finished, event.finish_reason or "")
            if event.finished:
                self._batcher.result(event.request_id)
                del self._live[event.request_id]
            if update is not None and not self._deliver(live, update) and not event.finished:
                self._drop(event.request_id)
        if self.stats["steps"] % self.CANCEL_CHECK_EVERY == 0:
            for rid, live in list(self._live.items()):
                if self._is_cancelled(live):
                    self._drop(rid)

    def _run_speculative(self, item: tuple) -> None:
        from nemo_ee.inference.speculative import generate_self_speculative

        live = _Live(*item)
        if self._is_cancelled(live):
            return
        self.stats["speculative"] += 1
        try:
            gen = generate_self_speculative(self.model, live.job.prompt_ids, live.job.params)
        except ValueError as err:
            self._deliver(live, Update([], [], error=str(err)))
            return
        self.stats["tokens"] += len(gen.token_ids)
        last = len(gen.token_ids) - 1
        for i, (token, depth) in enumerate(zip(gen.token_ids, gen.exit_layers)):
            update = live.add(self.tokenizer, token, depth, i == last, gen.finish_reason if i == last else "")
            if update is not None and not self._deliver(live, update):
                return

    # -------------------------------------------------------------------- helpers
    def _deliver(self, live: _Live, update: Update) -> bool:
        """Send ``update``; False when the client is gone (the sink raised)."""
        try:
            live.sink(update)
            return True
        except Exception as err:
            log.warning("could not send a response (%s: %s); dropping the request", type(err).__name__, err)
            return False

    @staticmethod
    def _is_cancelled(live: _Live) -> bool:
        try:
            return bool(live.cancelled and live.cancelled())
        except Exception:
            return False

    def _drop(self, rid: int) -> None:
        self._batcher.cancel(rid)
        self._live.pop(rid, None)
        self.stats["cancelled"] += 1

    def _fail_all(self, message: str) -> None:
        self.stats["errors"] += 1
        for live in list(self._live.values()):
            self._deliver(live, Update([], [], error=message))
        self._live.clear()
        self._batcher = self._new_batcher()


# ---------------------------------------------------------------------------------------------- Triton
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
        self.service = DecodeService(self.model, self.tokenizer, self.settings.max_inflight).start()
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
            pb.Tensor("finish_reason", np.array([[update.finish_reason.encode("utf-8")]], dtype=np.object_)),
        ]
        sender.send(pb.InferenceResponse(output_tensors=tensors),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if update.finished else 0)

    def finalize(self) -> None:
        if self.service is not None:
            self.service.stop()
            log.info("decode loop stopped: %s", dict(self.service.stats))
            self.service = None
