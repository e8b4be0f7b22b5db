"""Stages ``triton`` (export the calibrated EE-tuned model, serve it with tritonserver, query it with
tritonclient, stop it) and ``benchmarks`` (every scripts/bench_*.py with short settings, RESULT lines)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nemo_ee.pipeline.base import StageContext, StageResult, plain_dict, write_json
from nemo_ee.pipeline.report import Section, markdown_table, text_table

REPO = Path(__file__).resolve().parents[2]
TRITON_KEYS = ("queries", "chat_queries", "max_tokens", "chat_max_tokens", "protocol", "start_timeout",
               "request_timeout")
BENCH_WHAT = {  # one line each for the report; each script's docstring has the details
    "bench_bubble_fill": "PP=2 training with bubble-filling micro-batches vs without, same wall-clock budget: "
                         "exit-loss progress ratio",
    "bench_decode": "early-exit vs full decoding: efficiency, speedup at 98% agreement, self-speculative, batched",
    "bench_real_model": "SmolLM2 (real model): full decode vs HF generate at batch 1 / 8, early exit at the "
                        "calibrated thresholds, self-speculative vs HF generate and HF assistant_early_exit",
    "bench_pipeline_comm": "PP=2 training: point-to-point messages per step with vs without exits, step-time ratio",
    "bench_train_overhead": "training step time with exits / without, measured vs FLOP prediction",
    "bench_tuning": "EE-Tuning vs full fine-tuning: step-time and memory ratios",
    "bench_triton": "Triton vs in-process decoding, 1/4/8 clients: tokens/s ratio, lost requests, p99 latency",
}
BENCHES = tuple(sorted(p.stem for p in (REPO / "scripts").glob("bench_*.py")))  # every one needs an entry
BENCH_KEYS = frozenset({"timeout", *BENCHES})


# ---------------------------------------------------------------------------------------------- triton
def triton_settings(cfg: DictConfig) -> dict:
    """What the Triton stage depends on: the queries, their length, the protocol and timeouts."""
    stage = plain_dict(cfg.stages.triton)
    return {k: stage.get(k) for k in TRITON_KEYS}


def check_triton(cfg: DictConfig, given: dict) -> None:
    """Non-empty text queries, positive max_tokens and timeouts, grpc or http; tritonserver and tritonclient found."""
    s = triton_settings(cfg)
    for name in ("queries", "chat_queries"):
        queries = s[name]
        if not isinstance(queries, list) or not queries or not all(isinstance(q, str) and q for q in queries):
            raise ValueError(f"stages.triton.{name}={queries!r} must be a non-empty list of non-empty strings")
    for key in ("max_tokens", "chat_max_tokens", "start_timeout", "request_timeout"):
        value = s[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"stages.triton.{key}={value!r} must be a positive number")
    if s["protocol"] not in ("grpc", "http"):
        raise ValueError(f"stages.triton.protocol={s['protocol']!r} is not one of ['grpc', 'http']")
    try:
        import tritonclient.grpc  # noqa: F401

        from nemo_ee.deploy.triton.server import find_tritonserver

        find_tritonserver()
    except (ImportError, OSError, FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"stages.triton: Triton is not usable here ({exc}); install the triton extra "
                         f"(pip install -e '.[triton]') or set stages.triton.skip=true") from None


def run_triton(ctx: StageContext) -> StageResult:
    """Export the calibrated EE-tuned model, start tritonserver, send the queries, compare with local decoding."""
    from nemo_ee.deploy.triton import client
    from nemo_ee.deploy.triton.repository import read_parameters, write_repository
    from nemo_ee.deploy.triton.server import TritonServer, free_port
    from nemo_ee.inference.generate import GenerationParams, generate
    from nemo_ee.inference.loading import inference_defaults, load_nemo_for_inference

    s = triton_settings(ctx.cfg)
    chat = "real_calibrate" in ctx.inputs  # the real model when the run has one: chat requests
    nemo_path = ctx.inputs["real_calibrate" if chat else "calibrate"]["nemo"]
    max_tokens = int(s["chat_max_tokens"] if chat else s["max_tokens"])
    repo = ctx.stage_dir / "repository"
    model_dir = write_repository(nemo_path, repo, "ee_gpt", copy=False, overwrite=True, num_threads=1)
    params = read_parameters(model_dir)
    print(f"exported {nemo_path} -> {model_dir} (exit_thresholds {params.get('exit_thresholds') or '-'})", flush=True)
    local = load_nemo_for_inference(nemo_path)  # the same request decoded in this process, for comparison
    local_params = GenerationParams(max_tokens=max_tokens, stop_token_ids=tuple(local.tokenizer.eos_ids),
                                    **inference_defaults(local.cfg))
    answers: list[dict[str, Any]] = []
    t0 = time.time()
    for attempt in (1, 2):  # a server that never gets ready (a busy shared machine) is retried once on new ports
        http, grpc = free_port(), free_port()
        while grpc == http:
            grpc = free_port()
        server = TritonServer(repo, http_port=http, grpc_port=grpc, log=ctx.stage_dir / f"tritonserver_{attempt}.log")
        try:
            server.start(timeout=float(s["start_timeout"]))
            break
        except (TimeoutError, RuntimeError) as exc:
            if attempt == 2:
                raise
            print(f"tritonserver did not start ({str(exc).splitlines()[0]}); trying once more", flush=True)
    started = time.time() - t0
    print(f"tritonserver ready in {started:.1f}s (HTTP {server.http_url}, gRPC {server.grpc_url})", flush=True)
    try:
        url = server.grpc_url if s["protocol"] == "grpc" else server.http_url
        for text in s["chat_queries" if chat else "queries"]:
            if chat:  # sent as a chat: the server applies the model's chat template
                messages = [{"role": "user", "content": text}]
                result = client.generate(url, "ee_gpt", None, max_tokens, s["protocol"], True,
                                         float(s["request_timeout"]), messages=json.dumps(messages))
                ids = local.tokenizer.apply_chat_template(messages)
            else:
                result = client.generate(url, "ee_gpt", text, max_tokens, s["protocol"], True,
                                         float(s["request_timeout"]))
                ids = local.tokenizer.encode(text)
            mine = generate(local.model, [ids], local_params)[0]
            answers.append({"prompt": text, "text": result.text, "output_ids": list(result.output_ids),
                            "exit_layers": list(result.exit_layers), "finish_reason": result.finish_reason,
                            "seconds": result.seconds, "first_seconds": result.first_seconds,
                            "same_as_local": list(result.output_ids) == list(mine.token_ids)
                            and list(result.exit_layers) == list(mine.exit_layers)})
            print(f"  {text!r} -> {result.text!r} ({len(result.output_ids)} tokens, {result.seconds:.2f}s, "
                  f"same as local decoding: {answers[-1]['same_as_local']})", flush=True)
    finally:
        server.stop()
    print("tritonserver stopped", flush=True)
    json_path = ctx.stage_dir / "answers.json"
    write_json(json_path, {"nemo": nemo_path, "repository": str(repo), "startup_s": started, "answers": answers})
    layers = local.ee_config.num_layers
    cell = lambda text: f"`{text!r}`".replace("|", "\\|")  # noqa: E731 - a table cell never breaks the table
    rows = [[cell(a["prompt"]), cell(a["text"]), len(a["output_ids"]), a["finish_reason"],
             sum(a["exit_layers"]) / max(1, len(a["exit_layers"])), a["seconds"], "yes" if a["same_as_local"] else "NO"]
            for a in answers]
    headers = ["prompt", "answer", "tokens", "finish", f"mean exit depth (of {layers})", "seconds",
               "same as local decoding"]
    print(text_table(headers, [[repr(a["prompt"]), repr(a["text"]), *r[2:]] for a, r in zip(answers, rows)], 2),
          flush=True)
    what = ("chat messages (the server applies the model's chat template; answers end at its eos)" if chat
            else "plain prompts")
    body = (f"The calibrated EE-tuned {'real model' if chat else 'model'} (`{nemo_path}`) exported to a Triton model "
            f"repository, queried with {what}: "
            f"`{model_dir}` (nemo_ee's Python backend with in-flight batching; default thresholds from the "
            f"calibration), served by a real `tritonserver` on loopback (ready after {started:.0f}s), queried "
            f"through tritonclient ({s['protocol']}, streaming, {max_tokens} tokens at most), then stopped. "
            f"Each answer is compared with decoding the same prompt in this process.\n\n"
            + markdown_table(headers, rows, 2) + f"\n\nAnswers: `{json_path.relative_to(ctx.run_dir).as_posix()}`; "
            f"server log: `triton/tritonserver_{attempt}.log`.")
    return StageResult({"answers_json": str(json_path), "startup_s": started,
                        "same_as_local": all(a["same_as_local"] for a in answers)},
                       [Section("Serving on Triton", body)])


# ---------------------------------------------------------------------------------------------- benchmarks
def bench_settings(cfg: DictConfig) -> dict:
    """Every benchmark's switch and arguments, and the per-benchmark timeout."""
    stage = plain_dict(cfg.stages.benchmarks)
    return {k: stage.get(k) for k in sorted(BENCH_KEYS)}


def check_benchmarks(cfg: DictConfig, given: dict) -> None:
    """Each bench_* entry: ``enabled`` true/false and ``args`` a list of strings; the script exists."""
    s = bench_settings(cfg)
    timeout = s["timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"stages.benchmarks.timeout={timeout!r} must be a positive number of seconds")
    for name in BENCHES:
        entry = s[name]
        if entry is None:
            raise ValueError(f"stages.benchmarks.{name} is missing: give scripts/{name}.py an entry "
                             f"{{enabled: true|false, args: [...]}} (its defaults may run for a long time)")
        if not isinstance(entry, dict) or set(entry) - {"enabled", "args"}:
            raise ValueError(f"stages.benchmarks.{name}={entry!r} must be {{enabled: true|false, args: [...]}}")
        if not isinstance(entry.get("enabled", True), bool):
            raise ValueError(f"stages.benchmarks.{name}.enabled={entry.get('enabled')!r} must be true or false")
        args = entry.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
            raise ValueError(f"stages.benchmarks.{name}.args={args!r} must be a list of strings")


def parse_result(line: str) -> dict[str, Any]:
    """``RESULT a=1.5 b=true`` -> {"a": 1.5, "b": "true"} (numbers as floats)."""
    out: dict[str, Any] = {}
    for item in line.split()[1:]:
        key, _, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def run_bench(name: str, args: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``scripts/<name>.py args`` (output to ``log``); its last RESULT line, exit code and seconds."""
    cmd = [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    print(f"  $ {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=log.parent)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.time() - t0
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    result = next((ln.strip() for ln in reversed(lines) if ln.startswith("RESULT ")), None)
    status = "ok" if code == 0 and result else (f"timed out after {timeout:.0f}s" if code is None
                                               else f"exit code {code}" if code else "no RESULT line")
    print(f"    {status} in {seconds:.1f}s: {result or lines[-1:] }", flush=True)
    return {"status": status, "result": result, "values": parse_result(result) if result else {},
            "seconds": round(seconds, 2), "log": str(log), "command": cmd[1:]}


def run_benchmarks(ctx: StageContext) -> StageResult:
    """Every enabled scripts/bench_*.py, one after the other; ``{nemo}`` in args is the EE-tuned model."""
    s = bench_settings(ctx.cfg)
    source = ctx.inputs.get("calibrate") or ctx.inputs.get("ee_tune") or ctx.inputs.get("pretrain_ee") or {}
    real = {"{real_nemo}": (ctx.inputs.get("real_calibrate") or {}).get("nemo"),
            "{real_hf_dir}": (ctx.inputs.get("real_import") or {}).get("hf_dir")}
    results: dict[str, dict] = {}
    for name in BENCHES:
        entry = s[name]
        if not entry.get("enabled", True):
            results[name] = {"status": "disabled", "result": None}
            continue
        args = [str(a) for a in entry.get("args") or []]
        if any("{nemo}" in a for a in args) and not source.get("nemo"):
            results[name] = {"status": "skipped: no early-exit model in this run", "result": None}
            continue
        if any(key in a and not value for a in args for key, value in real.items()):
            results[name] = {"status": "skipped: no calibrated real model in this run", "result": None}
            continue
        out = (ctx.stage_dir / name).resolve()  # absolute: each benchmark runs in its own directory
        out.mkdir(parents=True, exist_ok=True)
        nemo = Path(str(source.get("nemo"))).resolve()
        args = [a.replace("{nemo}", str(nemo)).replace("{out}", str(out)) for a in args]
        for key, value in real.items():
            args = [a.replace(key, str(Path(str(value)).resolve())) if value else a for a in args]
        results[name] = run_bench(name, args, out / "output.log", float(s["timeout"]))
    json_path = ctx.stage_dir / "results.json"
    write_json(json_path, results)
    rows = [[f"`{name}.py`", BENCH_WHAT.get(name, "see the script's docstring"), r["status"], r.get("seconds"),
             f"`{r['result']}`" if r.get("result") else "—"] for name, r in results.items()]
    args_list = "\n".join(f"- `{name}.py {' '.join(str(a) for a in s[name].get('args') or [])}`"
                          for name in results if s[name].get("enabled", True))
    body = ("Every `scripts/bench_*.py`, run as a subprocess on this machine with the short settings of "
            "`stages.benchmarks` (not their defaults: the numbers are noisier than a full run's). Each script's "
            "docstring says what its RESULT line measures.\n\n" + markdown_table(["benchmark", "what it measures", "status",
                                                                                    "seconds", "RESULT line"], rows, 1)
            + f"\n\nCommands:\n{args_list}\n\nOutputs: `benchmarks/<name>/output.log`; numbers: "
            f"`{json_path.relative_to(ctx.run_dir).as_posix()}`.")
    return StageResult({"results_json": str(json_path),
                        "results": {k: {"status": v["status"], "result": v.get("result")} for k, v in results.items()}},
                       [Section("Benchmarks (RESULT lines)", body)])
