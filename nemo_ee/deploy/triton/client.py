"""Client helpers for the early-exit model on Triton (used by scripts/query_triton.py and the tests).

Triton serves a decoupled (streaming) model only through streaming APIs: KServe ``infer`` over HTTP
answers 501 and gRPC ``ModelInfer`` UNIMPLEMENTED for it. So:

- gRPC: tritonclient's bidirectional stream (:func:`stream_grpc`), one stream per request so that an
  error response (which carries no request id on the stream) belongs to that request;
- HTTP: Triton's generate extension, ``POST /v2/models/<name>/generate`` (one final response, ``stream``
  false) and ``.../generate_stream`` (server-sent events, one per token), JSON in and out.

No torch needed: this module imports numpy and tritonclient only.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator, Optional

import numpy as np

from nemo_ee.deploy.triton.interface import INPUT_BY_NAME

_NUMPY = {"BYTES": np.object_, "INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_}
_ids = itertools.count()


class RequestError(RuntimeError):
    """The server answered the request with an error (its message is the exception's)."""


@dataclasses.dataclass
class Chunk:
    """One response: its tokens, their exit layers and the text they add."""

    token_ids: list
    exit_layers: list
    text: str
    finish_reason: str = ""


@dataclasses.dataclass
class Result:
    """A whole generation as the client saw it."""

    text: str
    output_ids: list
    exit_layers: list
    finish_reason: str
    chunks: list                    # the responses, in arrival order
    seconds: float = 0.0            # request sent -> last response
    first_seconds: float = 0.0      # request sent -> first response

    @classmethod
    def of(cls, chunks: list, started: float, first: Optional[float]) -> "Result":
        return cls("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                   [d for c in chunks for d in c.exit_layers], chunks[-1].finish_reason if chunks else "",
                   chunks, time.perf_counter() - started, (first or time.perf_counter()) - started)


def request_arrays(text: Any, max_tokens: Any, stream: bool = False, **options: Any) -> dict:
    """Input arrays (leading batch dimension 1) by name; options use the tensor names (None: not sent).

    ``text`` may be bytes (sent as is, e.g. non-UTF-8 test input); ``stop_words`` is a list of strings.
    """
    values = dict(options, text_input=text, max_tokens=max_tokens, stream=stream)
    arrays = {}
    for name, value in values.items():
        if value is None:
            continue
        if name not in INPUT_BY_NAME:
            raise ValueError(f"unknown input {name!r}; inputs are {sorted(INPUT_BY_NAME)}")
        spec = INPUT_BY_NAME[name]
        items = list(value) if spec.dims == (-1,) else [value]
        if spec.dtype == "BYTES":
            items = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in items]
        arrays[name] = np.array([items], dtype=_NUMPY[spec.dtype])
    return arrays


def _grpc_inputs(arrays: dict) -> list:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array in arrays.items():
        item = grpcclient.InferInput(name, list(array.shape), INPUT_BY_NAME[name].dtype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def _chunk(result: Any) -> Optional[Chunk]:
    ids = result.as_numpy("output_ids")
    if ids is None:
        return None
    text = result.as_numpy("text_output")
    reason = result.as_numpy("finish_reason")
    return Chunk([int(t) for t in ids.reshape(-1)], [int(d) for d in result.as_numpy("exit_layers").reshape(-1)],
                 text.reshape(-1)[0].decode("utf-8") if text is not None else "",
                 reason.reshape(-1)[0].decode("utf-8") if reason is not None else "")


def _message(error: Any) -> str:
    return error.message() if callable(getattr(error, "message", None)) else str(error)


class GrpcSession:
    """One gRPC connection and bidirectional stream, reused for many requests sent one at a time.

    What a client that keeps its connection does (a load generator, a chat front end): no channel set-up
    per request. One request is in flight at a time, so every response on the stream, an error response
    included, belongs to it. A request left before its final response (the iterator closed, a timeout)
    cancels it by closing the stream; the next request opens a new one. A context manager.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: Any = None
        self._responses: "queue.Queue[tuple]" = queue.Queue()

    def _open(self) -> None:
        import tritonclient.grpc as grpcclient

        self._responses = queue.Queue()
        responses = self._responses
        self._client = grpcclient.InferenceServerClient(self.url)
        self._client.start_stream(callback=lambda result=None, error=None: responses.put((result, error)))

    def close(self, cancel: bool = True) -> None:
        """Close the stream (``cancel``: cancel a request still running on it) and the connection."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.stop_stream(cancel_requests=cancel)
            finally:
                client.close()

    def __enter__(self) -> "GrpcSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, model: str, arrays: dict, timeout: float = 120.0) -> Iterator[Chunk]:
        """Send one request and yield its responses until the final one.

        Raises :class:`RequestError` with the server's message for an error response, ConnectionError when
        the server cannot be reached, TimeoutError when no response comes within ``timeout`` seconds of the
        previous one.
        """
        if self._client is None:
            self._open()
        responses, finished, usable = self._responses, False, True
        try:
            try:
                self._client.async_stream_infer(model, _grpc_inputs(arrays), request_id=f"ee-{next(_ids)}",
                                                enable_empty_final_response=True)
            except Exception as err:  # the stream broke before the request left (e.g. no server): the cause is queued
                try:
                    err = responses.get(timeout=5)[1] or err
                except queue.Empty:
                    pass
                finished, usable = True, False
                raise ConnectionError(f"cannot stream to {self.url}: {_message(err)}") from None
            while not finished:
                try:
                    result, error = responses.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"no response from {self.url} within {timeout:.0f}s") from None
                if error is not None:
                    finished = True
                    if "UNAVAILABLE" in str(getattr(error, "status", lambda: "")()):  # gRPC: nobody listening there
                        usable = False
                        raise ConnectionError(f"cannot reach a Triton server at {self.url} (grpc): {_message(error)}")
                    usable = bool(getattr(self._client._stream, "_active", True))
                    raise RequestError(_message(error))
                final = result.get_response().parameters.get("triton_final_response")
                finished = bool(final is not None and final.bool_param)
                chunk = _chunk(result)
                if chunk is not None:
                    yield chunk
        finally:
            if not (finished and usable):
                self.close(cancel=not finished)


def stream_grpc(url: str, model: str, arrays: dict, timeout: float = 120.0) -> Iterator[Chunk]:
    """Send one request over a gRPC stream of its own and yield its responses until the final one.

    Errors as :meth:`GrpcSession.stream`; the connection is closed at the end (leaving early cancels the request).
    """
    with GrpcSession(url) as session:
        yield from session.stream(model, arrays, timeout)


def generate_grpc(url: str, model: str, text: Any, max_tokens: Any, stream: bool = False,
                  timeout: float = 120.0, on_chunk: Optional[Callable[[Chunk], None]] = None,
                  session: Optional[GrpcSession] = None, **options: Any) -> Result:
    """One generation over gRPC (``stream``: one response per token; ``on_chunk`` sees each as it arrives).

    ``session``: send it on that connection (kept open after); else on a connection of its own.
    """
    arrays = request_arrays(text, max_tokens, stream, **options)
    responses = session.stream(model, arrays, timeout) if session is not None else stream_grpc(url, model, arrays, timeout)
    started, first, chunks = time.perf_counter(), None, []
    for chunk in responses:
        first = first or time.perf_counter()
        chunks.append(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
    return Result.of(chunks, started, first)


def _json_chunk(data: dict) -> Chunk:
    def listed(value: Any) -> list:
        return [int(v) for v in (value if isinstance(value, list) else [value])]

    text = data.get("text_output", "")
    reason = data.get("finish_reason", "")
    return Chunk(listed(data.get("output_ids", [])), listed(data.get("exit_layers", [])),
                 "".join(text) if isinstance(text, list) else str(text),
                 "".join(reason) if isinstance(reason, list) else str(reason))


def generate_http(url: str, model: str, text: str, max_tokens: int, stream: bool = False,
                  timeout: float = 120.0, on_chunk: Optional[Callable[[Chunk], None]] = None,
                  **options: Any) -> Result:
    """One generation over HTTP with Triton's generate extension (``stream``: ``generate_stream``, SSE)."""
    body = {k: v for k, v in dict(options, text_input=text, max_tokens=max_tokens, stream=stream).items()
            if v is not None}
    endpoint = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/{endpoint}", method="POST",
                                     data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    started, first, chunks = time.perf_counter(), None, []
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if not stream:
                chunks.append(_json_chunk(json.loads(response.read())))
                first = time.perf_counter()
                if on_chunk is not None:
                    on_chunk(chunks[-1])
            else:
                for line in response:
                    line = line.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    data = json.loads(line[len("data:"):])
                    if "error" in data:
                        raise RequestError(data["error"])
                    first = first or time.perf_counter()
                    chunks.append(_json_chunk(data))
                    if on_chunk is not None:
                        on_chunk(chunks[-1])
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise RequestError(detail) from None
    return Result.of(chunks, started, first)


def generate(url: str, model: str, text: Any, max_tokens: Any, protocol: str = "grpc", stream: bool = False,
             timeout: float = 120.0, on_chunk: Optional[Callable[[Chunk], None]] = None, **options: Any) -> Result:
    """:func:`generate_grpc` or :func:`generate_http`."""
    if protocol == "grpc":
        return generate_grpc(url, model, text, max_tokens, stream, timeout, on_chunk, **options)
    if protocol == "http":
        return generate_http(url, model, text, max_tokens, stream, timeout, on_chunk, **options)
    raise ValueError(f"protocol {protocol!r} is not one of ['grpc', 'http']")


def wait_ready(url: str, model: str, timeout: float = 60.0) -> None:
    """Wait until the HTTP endpoint ``url`` says ``model`` is ready (tritonclient.http)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.is_model_ready(model):
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model!r} at {url} was not ready within {timeout:.0f}s")
            time.sleep(0.5)
    finally:
        client.close()
