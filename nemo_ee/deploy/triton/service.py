"""The decode loop behind the Triton backend: one thread owns the model and a ContinuousBatcher (in-flight batching)."""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
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
    """A request being decoded: its tokens so far and the text already streamed.

    ``gone`` is set by the :class:`Responder` thread (its client went away: a send failed or the request was
    cancelled) and read by the decode loop, which then drops the sequence from the batch.
    """

    def __init__(self, job: Job, sink: Callable[[Update], None], cancelled: Optional[Callable[[], bool]]) -> None:
        self.job, self.sink, self.cancelled = job, sink, cancelled
        self.ids: list[int] = []
        self.exits: list[int] = []
        self.sent_text = ""
        self.gone = False

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


def _asks_cancelled(live: _Live) -> bool:
    """``live.cancelled()``; a flag that cannot be read counts as not cancelled."""
    try:
        return bool(live.cancelled())
    except Exception:
        return False


class Responder:
    """Sends the updates of the decode loop from a thread of its own, in order, so that decoding never waits.

    In Triton's Python backend ``response_sender.send`` is a synchronous round trip to the server process (the
    stub waits until the server has taken the response), and ``request.is_cancelled()`` is another; done on the
    decode thread, each token of each row would stall the whole batch. Here the decode loop only queues
    ``(live, update)``; this thread calls the sinks (FIFO: each request's updates stay in order), and every
    ``poll_seconds`` asks the unfinished requests whether they were cancelled. A sink that raises, or a
    cancelled request, marks its :class:`_Live` ``gone``; nothing more is sent to it and the decode loop drops
    it at the next token boundary.
    """

    def __init__(self, poll_seconds: float = 0.25) -> None:
        self.poll_seconds = float(poll_seconds)
        self._queue: "queue.SimpleQueue[Optional[list]]" = queue.SimpleQueue()
        self._watched: dict[int, _Live] = {}  # id(live) -> live: unfinished requests with a cancellation flag
        self._lock = threading.Lock()
        self._poll_soon = False
        self._thread: Optional[threading.Thread] = None
        self.stats = collections.Counter()    # sent, send_seconds, cancel_polls, gone

    def start(self) -> "Responder":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ee-responder", daemon=True)
            self._thread.start()
        return self

    def watch(self, live: _Live) -> None:
        """Poll ``live``'s cancellation flag until its last update is sent."""
        if live.cancelled is not None:
            with self._lock:
                self._watched[id(live)] = live
                self._poll_soon = True  # a request cancelled before it started leaves at once

    def put(self, live: _Live, update: Update) -> None:
        """Queue ``update`` for ``live`` (sent by this thread; sent at once when the thread is not running)."""
        self.put_all([(live, update)])

    def put_all(self, items: list) -> None:
        """Queue ``(live, update)`` pairs in order, as one item: one wake-up of this thread per decode step."""
        if not items:
            return
        if self._thread is None:
            for live, update in items:
                self._send(live, update)
        else:
            self._queue.put(items)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        next_poll = time.monotonic() + self.poll_seconds
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_poll - time.monotonic()))
            except queue.Empty:
                item = []
            if item is None:
                return
            for live, update in item:
                self._send(live, update)
            if self._poll_soon or time.monotonic() >= next_poll:
                self._poll_soon = False
                self._poll()
                next_poll = time.monotonic() + self.poll_seconds

    def _send(self, live: _Live, update: Update) -> None:
        if live.gone:
            return
        if update.finished or update.error is not None:
            with self._lock:
                self._watched.pop(id(live), None)
        started = time.perf_counter()
        try:
            live.sink(update)
        except Exception as err:
            log.warning("could not send a response (%s: %s); dropping the request", type(err).__name__, err)
            self._mark_gone(live)
        self.stats["sent"] += 1
        self.stats["send_seconds"] += time.perf_counter() - started

    def _poll(self) -> None:
        with self._lock:
            lives = list(self._watched.values())
        for live in lives:
            self.stats["cancel_polls"] += 1
            if _asks_cancelled(live):
                self._mark_gone(live)

    def _mark_gone(self, live: _Live) -> None:
        live.gone = True
        self.stats["gone"] += 1
        with self._lock:
            self._watched.pop(id(live), None)


class DecodeService:
    """The decode loop: one thread owns the model; :meth:`submit` may be called from any thread.

    ``sink(update)`` is called from the :class:`Responder` thread, once per token when the job streams, else
    once at the end; the update with ``finished`` (or ``error``) is the last one for that job. A sink that
    raises is taken as a client that went away, and so is a job whose ``cancelled()`` answers True: its
    sequence leaves the batch at the next token boundary.
    """

    def __init__(self, model: Any, tokenizer: Any, max_inflight: int = 8, cancel_poll_seconds: float = 0.25) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_inflight = int(max_inflight)
        self._inbox: "queue.Queue[tuple]" = queue.Queue()
        self._live: dict[int, _Live] = {}
        self._batcher = self._new_batcher()
        self._responder = Responder(cancel_poll_seconds)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stats = collections.Counter()  # steps, tokens, requests, speculative, max_rows, cancelled, errors, step_seconds

    def _new_batcher(self) -> Any:
        from nemo_ee.inference.scheduler import ContinuousBatcher

        return ContinuousBatcher(self.model, self.max_inflight)

    # -------------------------------------------------------------------- public
    @property
    def running(self) -> bool:
        """Whether the decode thread has been started."""
        return self._thread is not None

    def start(self) -> "DecodeService":
        self._responder.start()
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
        self._responder.close(timeout)  # what the loop queued is sent first
        pending = list(self._live.values())
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
        self.stats.update({f"responder_{k}": v for k, v in self._responder.stats.items()})

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
        idle = not self._batcher.busy
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
        for rid, live in list(self._live.items()):
            if live.gone:  # its client went away (seen by the responder thread)
                self._drop(rid)
        if self._batcher.busy:
            self._step()

    def _admit(self, job: Job, sink: Callable, cancelled: Optional[Callable]) -> None:
        self.stats["requests"] += 1
        live = _Live(job, sink, cancelled)
        try:
            rid = self._batcher.submit(job.prompt_ids, job.params)
        except ValueError as err:
            self._deliver(live, Update([], [], error=str(err)))
            return
        self._live[rid] = live
        self._responder.watch(live)
        self.stats["speculative"] += job.params.decode_mode == "self_speculative"

    def _step(self) -> None:
        rows = len(self._batcher.running) + min(len(self._batcher.waiting), len(self._batcher.free))
        started = time.perf_counter()
        events = self._batcher.step()
        self.stats["step_seconds"] += time.perf_counter() - started
        self.stats["steps"] += 1
        if rows > self.stats["max_rows"]:
            self.stats["max_rows"] = rows
            log.info("in-flight batch: %d sequences decoded together (a new peak)", rows)
        outgoing = []
        for event in events:
            live = self._live.get(event.request_id)
            if live is None:
                continue
            self.stats["tokens"] += 1
            update = live.add(self.tokenizer, event.token, event.depth, event.finished, event.finish_reason or "")
            if event.finished:
                self._batcher.result(event.request_id)
                del self._live[event.request_id]
            if update is not None:
                outgoing.append((live, update))
        self._responder.put_all(outgoing)

    # -------------------------------------------------------------------- helpers
    def _deliver(self, live: _Live, update: Update) -> None:
        """Queue ``update`` for the responder thread (sent at once when it is not running)."""
        self._responder.put(live, update)

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
