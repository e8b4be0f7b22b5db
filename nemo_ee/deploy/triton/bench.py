"""Triton vs in-process decoding of one early-exit .nemo, same prompts and settings (scripts/bench_triton.py).

In-process, the model is driven the way the Triton backend drives it: one
:class:`~nemo_ee.inference.scheduler.ContinuousBatcher` with the server's ``max_inflight`` rows, fed by a
closed loop that keeps ``c`` requests in flight (a finished request is replaced by the next prompt at the
next token boundary), as ``c`` clients that each send their next request when the last one returns.
Through Triton, ``c`` client threads do exactly that with :func:`nemo_ee.deploy.triton.client.generate_grpc`
(gRPC stream; by default one response per token) against a server this module starts and stops; each client
keeps one connection and stream (:class:`~nemo_ee.deploy.triton.client.GrpcSession`) for all its requests, as
a real load generator does; the connection is opened at the start of the pass (inside the timed region).
Sequential batch-1 :func:`~nemo_ee.inference.generate.generate` is measured too; its outputs are the
reference answers. Greedy, no stop token (``end_id=-1``): every request generates ``max_tokens`` tokens.

Rounds alternate in-process / Triton per concurrency to spread a shared machine's drift over both sides;
warm-up rounds are not timed. Tokens/s are wall-clock (the server is another process).
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

CONCURRENCY = (1, 4, 8)   # clients; the RESULT line reports 8 clients vs in-process at 8 in flight
MODEL_NAME = "ee_gpt"


@dataclasses.dataclass
class Round:
    """One timed pass over the prompts: answers by prompt index, per-request latencies, wall seconds."""

    side: str                                     # "in-process", "batch-1" or "triton"
    concurrency: int
    seconds: float = 0.0
    outputs: dict = dataclasses.field(default_factory=dict)     # index -> (token ids, exit layers)
    latencies: list = dataclasses.field(default_factory=list)   # request start -> last token, seconds
    first: list = dataclasses.field(default_factory=list)       # request start -> first token, seconds
    errors: dict = dataclasses.field(default_factory=dict)      # index -> error message

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.outputs.values())

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def lost(self, reference: Sequence[tuple], count: int) -> int:
        """Requests of ``count`` that failed, never finished, or whose ids / exits differ from ``reference``."""
        return sum(1 for i in range(count) if self.outputs.get(i) != tuple(map(list, reference[i])))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation; nan for no values)."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def decoding_settings(nemo_cfg: Any, exit_policy: Optional[str], threshold: Optional[float],
                      fallback_threshold: float = 0.9) -> dict:
    """GenerationParams fields both sides use: --exit-policy/--threshold, else the .nemo's calibrated ones.

    A .nemo without calibration and no --threshold decodes with max_prob at ``fallback_threshold``.
    """
    from nemo_ee.inference.loading import inference_defaults
    from nemo_ee.inference.policies import POLICIES, check_threshold

    calibrated = inference_defaults(nemo_cfg)
    if exit_policy is not None and exit_policy not in POLICIES:
        raise ValueError(f"exit_policy {exit_policy!r} is not one of {list(POLICIES)}")
    policy = exit_policy or calibrated.get("exit_policy", "max_prob")
    if threshold is not None:
        return {"exit_policy": policy, "threshold": check_threshold(policy, threshold)}
    has_table = bool(calibrated.get("exit_thresholds")) or calibrated.get("threshold") is not None
    if has_table and policy == calibrated.get("exit_policy", "max_prob"):
        return {k: v for k, v in calibrated.items() if k in ("exit_policy", "exit_thresholds", "threshold")}
    if exit_policy is not None and exit_policy != "max_prob":
        raise ValueError(f"exit_policy {exit_policy!r} needs --threshold (the .nemo has no thresholds for it)")
    return {"exit_policy": "max_prob", "threshold": fallback_threshold}


def prompt_texts(nemo: Any, count: int, prompt_tokens: int, max_tokens: int,
                 prompts_file: Optional[str] = None) -> list[str]:
    """``count`` prompt texts: the file's (cycled), else windows of the .nemo's validation split, decoded.

    Each must re-encode to a prompt that leaves room for ``max_tokens`` in the context.
    """
    from nemo_ee.inference.cli import read_prompts, validation_prompts
    from nemo_ee.inference.generate import context_limit

    if prompts_file:
        given = read_prompts(prompts_file)
        if not given:
            raise ValueError(f"prompts file {prompts_file} holds no prompt")
        texts = [given[i % len(given)] for i in range(count)]
    else:
        windows = validation_prompts(nemo, count, prompt_tokens)
        texts = [nemo.tokenizer.decode(ids, skip_special_tokens=True) for ids in windows]
    context = context_limit(nemo.model)
    for text in texts:
        n = len(nemo.tokenizer.encode(text))
        if n == 0 or n + max_tokens > context:
            raise ValueError(f"prompt {text[:40]!r} is {n} tokens; with max_tokens={max_tokens} it needs "
                             f"1..{context - max_tokens} tokens (context {context}): lower --prompt-len or --max-tokens")
    return texts


def batch1_round(model: Any, prompts: Sequence[Sequence[int]], params: Any) -> Round:
    """Sequential batch-1 :func:`generate` of every prompt (the reference answers)."""
    from nemo_ee.inference.generate import generate

    out = Round("batch-1", 1)
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        gen = generate(model, [prompt], params)[0]
        out.latencies.append(time.perf_counter() - t0)
        out.outputs[i] = (list(gen.token_ids), list(gen.exit_layers))
    out.seconds = time.perf_counter() - started
    return out


def inprocess_round(batcher: Any, prompts: Sequence[Sequence[int]], params: Any, concurrency: int) -> Round:
    """A closed loop keeping ``concurrency`` requests in flight on ``batcher`` (the server's decode loop, minus Triton)."""
    import torch

    out = Round("in-process", concurrency)
    todo = list(range(len(prompts)))[::-1]
    ids: dict[int, int] = {}
    started: dict[int, float] = {}
    seen: set[int] = set()
    begin = time.perf_counter()

    def admit() -> None:
        while todo and len(ids) < concurrency:
            i = todo.pop()
            started[i] = time.perf_counter()
            ids[batcher.submit(prompts[i], params)] = i

    with torch.no_grad():
        admit()
        while batcher.busy:
            for event in batcher.step():
                i = ids[event.request_id]
                if i not in seen:
                    seen.add(i)
                    out.first.append(time.perf_counter() - started[i])
                if event.finished:
                    gen = batcher.result(event.request_id)
                    del ids[event.request_id]
                    out.latencies.append(time.perf_counter() - started[i])
                    out.outputs[i] = (list(gen.token_ids), list(gen.exit_layers))
            admit()
    out.seconds = time.perf_counter() - begin
    return out


def triton_round(url: str, texts: Sequence[str], max_tokens: int, concurrency: int, stream: bool = True,
                 timeout: float = 300.0, model: str = MODEL_NAME) -> Round:
    """``concurrency`` client threads, each sending its next prompt when its last answer is complete."""
    from nemo_ee.deploy.triton import client

    out = Round("triton", concurrency)
    todo: "queue.Queue[int]" = queue.Queue()
    for i in range(len(texts)):
        todo.put(i)
    lock = threading.Lock()

    def work(session: Any) -> None:
        with session:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    res = client.generate_grpc(url, model, texts[i], max_tokens, stream=stream, timeout=timeout,
                                               session=session, end_id=-1)
                except Exception as err:  # an error response, a broken stream, a timeout: the request is lost
                    with lock:
                        out.errors[i] = f"{type(err).__name__}: {err}"
                    continue
                with lock:
                    out.outputs[i] = (list(res.output_ids), list(res.exit_layers))
                    out.latencies.append(res.seconds)
                    out.first.append(res.first_seconds)

    sessions = [client.GrpcSession(url) for _ in range(concurrency)]  # each client keeps its connection
    threads = [threading.Thread(target=work, args=(sessions[k],), name=f"bench-client-{k}", daemon=True)
               for k in range(concurrency)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    deadline = begin + timeout * max(1, len(texts))
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()))
    out.seconds = time.perf_counter() - begin
    return out


@contextlib.contextmanager
def running_server(nemo: str | Path, workdir: str | Path, settings: dict, max_inflight: int, threads: int,
                   timeout: float = 900.0) -> Iterator[Any]:
    """Export ``nemo`` (linked) to ``workdir``, serve it on free loopback ports until ready; stopped on exit, error, Ctrl-C."""
    from nemo_ee.deploy.triton.repository import write_repository
    from nemo_ee.deploy.triton.server import ServerStartError, TritonServer, free_port

    write_repository(nemo, workdir, MODEL_NAME, copy=False, overwrite=True, exit_policy=settings.get("exit_policy"),
                     threshold=settings.get("threshold"), exit_thresholds=settings.get("exit_thresholds"),
                     decode_mode="early_exit", max_inflight=max_inflight, num_threads=threads)
    for attempt in (1, 2):  # a server that never gets ready is retried once, on new ports
        http = free_port()
        grpc = free_port()
        while grpc == http:
            grpc = free_port()
        server = TritonServer(workdir, http_port=http, grpc_port=grpc)
        try:
            server.start(timeout=timeout / 2)  # stops the server itself when it fails or is interrupted while starting
            break
        except ServerStartError:
            server.stop()
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        server.stop()


def summarize(rounds: Sequence[Round], reference: Sequence[tuple], count: int) -> dict:
    """Per concurrency: median tokens/s of each side, their ratio, pooled latency percentiles; lost requests."""
    rows = {}
    for c in sorted({r.concurrency for r in rounds if r.side == "triton"}):
        tri = [r for r in rounds if r.side == "triton" and r.concurrency == c]
        inp = [r for r in rounds if r.side == "in-process" and r.concurrency == c]
        tri_s = statistics.median(r.tok_s for r in tri)
        inp_s = statistics.median(r.tok_s for r in inp)
        lat = [x for r in tri for x in r.latencies]
        first = [x for r in tri for x in r.first]
        inp_lat = [x for r in inp for x in r.latencies]
        rows[c] = {"triton_tok_s": tri_s, "inprocess_tok_s": inp_s, "ratio": tri_s / inp_s,
                   "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "first_p50_s": percentile(first, 50),
                   "inprocess_p50_s": percentile(inp_lat, 50), "inprocess_p99_s": percentile(inp_lat, 99),
                   "requests": len(tri) * count, "lost": sum(r.lost(reference, count) for r in tri),
                   "inprocess_mismatch": sum(r.lost(reference, count) for r in inp)}
    batch1 = [r for r in rounds if r.side == "batch-1"]
    return {"rows": rows, "batch1_tok_s": statistics.median(r.tok_s for r in batch1) if batch1 else float("nan"),
            "lost": sum(row["lost"] for row in rows.values()),
            "errors": [msg for r in rounds for msg in r.errors.values()]}


def table(summary: dict) -> str:
    """The human-readable table of :func:`summarize`."""
    head = (f"{'clients':>7} {'in-proc tok/s':>13} {'triton tok/s':>12} {'ratio':>6} {'p50 s':>7} {'p99 s':>7} "
            f"{'1st tok p50':>11} {'in-proc p50':>11} {'in-proc p99':>11} {'lost':>9}")
    lines = [head]
    for c, row in summary["rows"].items():
        lines.append(f"{c:7d} {row['inprocess_tok_s']:13.1f} {row['triton_tok_s']:12.1f} {row['ratio']:6.3f} "
                     f"{row['p50_s']:7.3f} {row['p99_s']:7.3f} {row['first_p50_s']:11.3f} "
                     f"{row['inprocess_p50_s']:11.3f} {row['inprocess_p99_s']:11.3f} "
                     f"{row['lost']:>4d}/{row['requests']:<4d}")
    lines.append(f"in-process sequential batch 1 (generate, one prompt at a time): {summary['batch1_tok_s']:.1f} tok/s")
    return "\n".join(lines)


def result_line(summary: dict, clients: int = 8) -> str:
    """The benchmark's last line (format fixed by issue 6): 8 clients vs in-process at 8 in flight."""
    row = summary["rows"][clients]
    return (f"RESULT triton_vs_inprocess={row['ratio']:.3f} lost_requests={summary['lost']} "
            f"p99_latency_8_clients_s={row['p99_s']:.3f}")


def run_benchmark(nemo_path: str | Path, args: Any) -> dict:
    """Everything after the model exists: load, prompts, server, warm-up, alternating rounds, summary.

    ``args``: prompts, prompt_len, max_tokens, exit_policy, threshold, repeats, threads, stream,
    prompts_file, timeout (see scripts/bench_triton.py).
    """
    import tempfile

    import torch

    from nemo_ee.inference.generate import GenerationParams
    from nemo_ee.inference.loading import load_nemo_for_inference
    from nemo_ee.inference.scheduler import ContinuousBatcher

    nemo = load_nemo_for_inference(nemo_path)
    model, tokenizer, ee = nemo.model, nemo.tokenizer, nemo.ee_config
    settings = decoding_settings(nemo.cfg, args.exit_policy, args.threshold)
    params = GenerationParams(max_tokens=args.max_tokens, stop_token_ids=(), **settings)
    texts = prompt_texts(nemo, args.prompts, args.prompt_len, args.max_tokens, args.prompts_file)
    prompts = [tokenizer.encode(t) for t in texts]
    inflight = max(CONCURRENCY)
    print(f"model {nemo_path}: {ee.num_layers} layers, hidden {ee.hidden_size}, exits after layers "
          f"{list(ee.exit_layer_nums)}; {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens, {args.max_tokens} new tokens each, greedy, no stop token; decoding {settings}; torch threads "
          f"{torch.get_num_threads()} on both sides; server in-flight batch {inflight}; Triton clients: gRPC stream, "
          f"{'one response per token' if args.stream else 'one final response'}", flush=True)
    rounds: list[Round] = []
    reference = [tuple(v) for _, v in sorted(batch1_round(model, prompts, params).outputs.items())]
    print("in-process reference answers ready; starting tritonserver", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_triton_") as workdir, \
            running_server(nemo_path, workdir, settings, inflight, torch.get_num_threads(), args.timeout) as server:
        print(f"tritonserver pid {server.process.pid} ready after {time.perf_counter() - started:.1f} s "
              f"(HTTP {server.http_url}, gRPC {server.grpc_url})", flush=True)
        batcher = ContinuousBatcher(model, inflight)
        warm = min(len(prompts), inflight)
        inprocess_round(batcher, prompts[:warm], params, inflight)  # warm-up, not timed
        triton_round(server.grpc_url, texts[:warm], args.max_tokens, inflight, args.stream, args.timeout)
        for rep in range(args.repeats):
            for c in CONCURRENCY:
                sides = ("in-process", "triton") if (rep + c) % 2 else ("triton", "in-process")
                for side in sides:
                    if side == "triton":
                        r = triton_round(server.grpc_url, texts, args.max_tokens, c, args.stream, args.timeout)
                    else:
                        r = inprocess_round(batcher, prompts, params, c)
                    rounds.append(r)
                    print(f"  pass {rep + 1}/{args.repeats} {c} client(s) {side:>10}: {r.tok_s:8.1f} tok/s, "
                          f"{len(r.outputs)}/{len(prompts)} answers in {r.seconds:.2f} s", flush=True)
        rounds.append(batch1_round(model, prompts, params))
    print("tritonserver stopped", flush=True)
    summary = summarize(rounds, reference, len(prompts))
    summary["settings"] = settings
    return summary
