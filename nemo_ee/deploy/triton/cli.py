"""Command lines of scripts/export_triton.py, scripts/serve_triton.py and scripts/query_triton.py.

User errors print ``error: <message>`` on stderr and give exit code 2.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence

USER_ERRORS = (OSError, ValueError, TimeoutError)  # OSError: missing files, ports in use, unreachable servers


def _run(fn: Callable[[], Optional[int]]) -> int:
    from nemo_ee.deploy.triton.client import RequestError
    from nemo_ee.deploy.triton.server import ServerStartError

    try:
        return int(fn() or 0)
    except (RequestError, ServerStartError, *USER_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


# ---------------------------------------------------------------------------------------------- export
def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_triton.py",
        description="Write a Triton model repository serving an early-exit .nemo with nemo_ee's Python backend "
                    "(decoupled: streaming; in-flight batching). Decoding defaults come from the .nemo's "
                    "calibration (scripts/calibrate.py) unless given here.",
        epilog="example: python scripts/export_triton.py --nemo ee.nemo --repository triton_repo && "
               "python scripts/serve_triton.py --repository triton_repo")
    p.add_argument("--nemo", required=True, help="the early-exit .nemo to serve")
    p.add_argument("--repository", required=True, help="model repository directory (created if missing)")
    p.add_argument("--name", default="ee_gpt", help="model name (default ee_gpt)")
    p.add_argument("--link", action="store_true",
                   help="reference the .nemo by absolute path instead of copying it into the repository")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--exit-policy", help="default exit policy (default: the calibrated one, else max_prob)")
    p.add_argument("--threshold", type=float, help="default threshold for every exit (replaces calibrated ones)")
    p.add_argument("--exit-thresholds", help='default per-exit thresholds as JSON, e.g. \'{"2": 0.9, "4": 0.8}\'')
    p.add_argument("--decode-mode", help="default decode mode: early_exit | self_speculative | full")
    p.add_argument("--max-inflight", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask (default context-1)")
    p.add_argument("--num-threads", type=int, default=0, help="torch threads in the backend (default 0: torch's)")
    p.add_argument("--instances", type=int, default=1, help="model instances (each loads the model; default 1)")
    return p


def run_export(args: argparse.Namespace, out: Any = None) -> None:
    from nemo_ee.deploy.triton.repository import read_parameters, write_repository

    out = out or sys.stdout
    table = None
    if args.exit_thresholds:
        try:
            table = {int(k): float(v) for k, v in json.loads(args.exit_thresholds).items()}
        except (ValueError, AttributeError) as err:
            raise ValueError(f"--exit-thresholds {args.exit_thresholds!r} is not a JSON object "
                             f"{{layer: threshold}}: {err}") from None
    model_dir = write_repository(
        args.nemo, args.repository, args.name, copy=not args.link, overwrite=args.overwrite,
        exit_policy=args.exit_policy, threshold=args.threshold, exit_thresholds=table, decode_mode=args.decode_mode,
        max_inflight=args.max_inflight, max_tokens_limit=args.max_tokens_limit, num_threads=args.num_threads,
        instance_count=args.instances)
    params = read_parameters(model_dir)
    print(f"wrote {model_dir}: config.pbtxt, 1/model.py" + ("" if args.link else ", 1/model.nemo"), file=out)
    for key in ("checkpoint", "exit_policy", "exit_thresholds", "early_exit_threshold", "decode_mode",
                "max_inflight", "max_tokens_limit"):
        print(f"  {key:<22}{params.get(key) or '-'}", file=out)
    print(f"serve: python scripts/serve_triton.py --repository {args.repository}", file=out, flush=True)


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    args = export_parser().parse_args(argv)
    return _run(lambda: run_export(args))


# ---------------------------------------------------------------------------------------------- serve
def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve_triton.py",
        description="Start tritonserver on a model repository written by export_triton.py (the binary of the "
                    "nvidia-pytriton wheel, or a system one), wait until it is ready, stop it cleanly on Ctrl-C.")
    p.add_argument("--repository", required=True, help="the model repository")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--tritonserver", help="a tritonserver binary (default: nvidia-pytriton's, else a system one)")
    p.add_argument("--log", help="write the server's log to this file (default: this terminal)")
    p.add_argument("--verbose", action="store_true", help="tritonserver --log-verbose=1")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness (default 600)")
    return p


def run_serve(args: argparse.Namespace, out: Any = None, stop: Optional[threading.Event] = None) -> int:
    from nemo_ee.deploy.triton.server import TritonServer

    out = out or sys.stdout
    stop = stop or threading.Event()
    server = TritonServer(args.repository, args.http_port, args.grpc_port, args.host, args.tritonserver,
                          log=args.log, verbose=args.verbose)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # Ctrl-C / kill: leave the wait loop, then stop
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        print(f"starting {server.binary} on {args.repository} ...", file=out, flush=True)
        server.start(timeout=args.timeout, cancel=stop)
        print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url} (Ctrl-C stops)", file=out, flush=True)
        while not stop.is_set() and server.process.poll() is None:
            stop.wait(0.5)
        code = server.process.returncode if server.process.poll() is not None else 0
        if code:
            print(f"error: tritonserver exited with code {code}", file=sys.stderr, flush=True)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping tritonserver ...", file=out, flush=True)
        server.stop()
        print("stopped", file=out, flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_main(argv: Optional[Sequence[str]] = None) -> int:
    args = serve_parser().parse_args(argv)
    return _run(lambda: run_serve(args))


# ---------------------------------------------------------------------------------------------- query
def query_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="query_triton.py",
        description="Send a prompt to the early-exit model on Triton and print the generated text.",
        epilog="examples: python scripts/query_triton.py 'def main(' --max-tokens 32 --stream --show-exits\n"
               "          python scripts/query_triton.py 'What does len() return?' --chat --max-tokens 96\n"
               "          python scripts/query_triton.py 'import ' --protocol http --threshold 0.8")
    p.add_argument("text", help="the prompt (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true",
                   help="send the text as a user message: the server applies the model's chat template")
    p.add_argument("--system", help="with --chat: a system message first")
    p.add_argument("--url", help="server address (default 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                   help="grpc: tritonclient streaming; http: Triton's generate / generate_stream endpoints")
    p.add_argument("--model", default="ee_gpt", help="model name (default ee_gpt)")
    p.add_argument("--stream", action="store_true", help="one response per token, printed as it arrives")
    p.add_argument("--show-exits", action="store_true",
                   help="mark each token with the layer it left at: text⟨depth⟩ (asks for per-token responses)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens (default 32)")
    p.add_argument("--threshold", type=float, help="early_exit_threshold (default: the model's)")
    p.add_argument("--exit-policy", help="max_prob | entropy | top2_margin (default: the model's)")
    p.add_argument("--decode-mode", help="early_exit | self_speculative | full (default: the model's)")
    p.add_argument("--num-draft-tokens", type=int, help="self_speculative: tokens per draft")
    p.add_argument("--draft-exit-layer", type=int, help="self_speculative: the exit layer that drafts")
    p.add_argument("--temperature", type=float, help="0: greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="random_seed")
    p.add_argument("--stop-word", action="append", help="a stop word (repeatable; single tokens)")
    p.add_argument("--end-id", type=int, help="end token id (-1: none; default the model's own end ids)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for each response (default 120)")
    return p


def run_query(args: argparse.Namespace, out: Any = None) -> Any:
    from nemo_ee.deploy.triton import client
    from nemo_ee.inference.render import CLOSE, OPEN

    out = out or sys.stdout
    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    options = dict(early_exit_threshold=args.threshold, exit_policy=args.exit_policy, decode_mode=args.decode_mode,
                   num_draft_tokens=args.num_draft_tokens, draft_exit_layer=args.draft_exit_layer,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, random_seed=args.seed,
                   stop_words=args.stop_word, end_id=args.end_id)
    text = args.text
    if args.system and not args.chat:
        raise ValueError("--system needs --chat")
    if args.chat:  # sent as messages: the server applies the model's chat template
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.text}]
        options["messages"], text = json.dumps(messages), None
    per_token = args.stream or args.show_exits

    def show(chunk: Any) -> str:
        if not args.show_exits:
            return chunk.text
        return "".join(f"{chunk.text if i == 0 else ''}{OPEN}{d}{CLOSE}" for i, d in enumerate(chunk.exit_layers))

    try:
        if args.stream:
            print(text or "", end="", file=out, flush=True)
            result = client.generate(url, args.model, text, args.max_tokens, args.protocol, True, args.timeout,
                                     on_chunk=lambda c: print(show(c), end="", file=out, flush=True), **options)
            print(file=out)
        else:
            result = client.generate(url, args.model, text, args.max_tokens, args.protocol, per_token,
                                     args.timeout, **options)
            print((text or "") + "".join(show(c) for c in result.chunks), file=out)
    except ConnectionError:
        raise
    except OSError as err:  # connection refused, unreachable (urllib): say where we tried
        raise ConnectionError(f"cannot reach a Triton server at {url} ({args.protocol}): {err}") from None
    depth = sum(result.exit_layers) / max(1, len(result.exit_layers))
    print(f"--- {len(result.output_ids)} tokens, finish={result.finish_reason}, mean exit depth {depth:.2f}, "
          f"{result.seconds:.2f}s (first response {result.first_seconds:.2f}s)", file=out, flush=True)
    return result


def query_main(argv: Optional[Sequence[str]] = None) -> int:
    args = query_parser().parse_args(argv)
    return _run(lambda: run_query(args) and 0)
