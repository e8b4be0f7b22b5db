"""The decode loop behind the Triton backend: one thread owns the model and a ContinuousBatcher (in-flight batching)."""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
from typing import Any, Callable, Optional

from nemo_ee.deploy.triton.requests import Job

log = logging.getLogger("nemo_ee.deploy.triton")


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
    @property
    def running(self) -> bool:
        """Whether the decode thread has been started."""
        return self._thread is not None

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
