"""A real tritonserver (nvidia-pytriton's binary) on free loopback ports serving an exported repository.

One server for the module (start-up loads torch, megatron and the model in the stub: the slow part).
Every answer is compared with in-process decoding of the same prompt and settings.
"""
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import CALIBRATED

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

if not all(__import__("importlib").util.find_spec(m) for m in ("pytriton", "tritonclient")):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the triton extra: pip install -e '.[triton]'")
    pytest.skip("the triton extra is not installed (pip install -e '.[triton]')", allow_module_level=True)

from nemo_ee.deploy.triton import client  # noqa: E402
from nemo_ee.deploy.triton.client import RequestError  # noqa: E402

NAME = "ee_gpt"
CALIBRATED_KW = dict(exit_policy=CALIBRATED["exit_policy"], exit_thresholds=CALIBRATED["exit_thresholds"])


def free_ports(n):
    from nemo_ee.deploy.triton.server import free_port

    ports = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


@pytest.fixture(scope="module")
def repository(bigram_nemo, tmp_path_factory):
    from nemo_ee.deploy.triton.repository import write_repository

    root = tmp_path_factory.mktemp("triton_repo")
    # one torch thread, as in this test process: the two sides then compute bit-identical logits
    write_repository(bigram_nemo[0], root, NAME, num_threads=1, max_inflight=4)
    return root


@pytest.fixture(scope="module")
def server(repository):
    from nemo_ee.deploy.triton.server import ServerStartError, TritonServer

    for attempt in (1, 2):  # a server that never gets ready (seen rarely under heavy load) is retried once
        http, grpc = free_ports(2)
        srv = TritonServer(repository, http_port=http, grpc_port=grpc)
        try:
            srv.start(timeout=300)
            break
        except ServerStartError:
            srv.stop()
            if attempt == 2:
                raise
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(bigram_nemo):
    from nemo_ee.inference.loading import load_nemo_for_inference

    nemo = load_nemo_for_inference(bigram_nemo[0])
    return nemo.model, nemo.tokenizer


@pytest.fixture(scope="module")
def prompts(bigram_nemo):
    return bigram_nemo[1]


def reference(local, text, max_tokens, **kwargs):
    """In-process (text_output, output_ids, exit_layers, finish_reason) with the server's defaults."""
    from nemo_ee.inference.generate import GenerationParams, generate

    model, tokenizer = local
    settings = dict(CALIBRATED_KW)
    settings.update(kwargs)
    if "threshold" in kwargs or "exit_policy" in kwargs:
        settings.pop("exit_thresholds", None)
    params = GenerationParams(max_tokens=max_tokens, stop_token_ids=(tokenizer.eos_id,), **settings)
    gen = generate(model, [tokenizer.encode(text)], params)[0]
    return tokenizer.decode(gen.token_ids, skip_special_tokens=True), gen.token_ids, gen.exit_layers, gen.finish_reason


def answer(result):
    return result.text, result.output_ids, result.exit_layers, result.finish_reason


def test_repository_layout_and_config(bigram_nemo, repository, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from nemo_ee.deploy.triton.cli import export_main
    from nemo_ee.deploy.triton.repository import read_parameters

    model_dir = repository / NAME
    assert sorted(p.name for p in model_dir.rglob("*")) == ["1", "config.pbtxt", "model.nemo", "model.py"]
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == (NAME, "python", 1)
    assert config.model_transaction_policy.decoupled
    # text_input or messages (a chat) carries the prompt: the backend requires exactly one of them
    assert [i.name for i in config.input if not i.optional] == ["max_tokens"]
    assert {"text_input", "messages", "chat"} <= {i.name for i in config.input if i.optional}
    assert {"temperature", "top_k", "top_p", "random_seed", "stop_words", "stream", "early_exit_threshold",
            "exit_policy", "decode_mode"} <= {i.name for i in config.input if i.optional}
    assert [o.name for o in config.output] == ["text_output", "output_ids", "exit_layers", "finish_reason"]
    assert config.instance_group[0].count == 1
    params = read_parameters(model_dir)
    assert params["checkpoint"] == "model.nemo" and params["exit_policy"] == "max_prob"
    assert params["exit_thresholds"] == '{"1": 0.6, "2": 0.4}'  # the .nemo's calibration
    assert "from nemo_ee.deploy.triton.backend import TritonBackend" in (model_dir / "1" / "model.py").read_text()

    # the script: overrides, a referenced checkpoint, errors before anything is written
    out = tmp_path / "repo"
    assert export_main(["--nemo", str(bigram_nemo[0]), "--repository", str(out), "--name", "m2", "--link",
                        "--exit-policy", "entropy", "--threshold", "2.5", "--max-inflight", "2"]) == 0
    params = read_parameters(out / "m2")
    assert params["checkpoint"] == str(Path(bigram_nemo[0]).resolve())
    assert not (out / "m2" / "1" / "model.nemo").exists()
    assert (params["exit_policy"], params["early_exit_threshold"], params["exit_thresholds"]) == ("entropy", "2.5", "")
    assert export_main(["--nemo", str(bigram_nemo[0]), "--repository", str(out), "--name", "m2"]) == 2  # exists
    assert export_main(["--nemo", str(bigram_nemo[0]), "--repository", str(out), "--name", "m3",
                        "--exit-policy", "entropy"]) == 2  # calibrated for max_prob: needs a threshold
    assert export_main(["--nemo", str(tmp_path / "absent.nemo"), "--repository", str(out)]) == 2
    assert not (out / "m3").exists() and not (out / NAME).exists()


def test_greedy_requests_equal_in_process_generate(server, local, prompts):
    depths = set()
    for i, text in enumerate(prompts[:6]):
        for options, kwargs in (({}, {}), ({"early_exit_threshold": 0.5}, {"threshold": 0.5})):
            got = client.generate_grpc(server.grpc_url, NAME, text, 6 + i, **options)
            want = reference(local, text, 6 + i, **kwargs)
            assert answer(got) == want, (text, options)
            assert len(got.chunks) == 1  # not streaming: one final response
            depths |= set(got.exit_layers)
    assert depths == {1, 2, 4}  # tokens left at both exits and at the final layer


def test_streaming_yields_the_same_tokens_in_order(server, local, prompts):
    for text in prompts[6:9]:
        want_text, want_ids, want_exits, reason = reference(local, text, 12)
        got = client.generate_grpc(server.grpc_url, NAME, text, 12, stream=True)
        assert [c.token_ids for c in got.chunks] == [[t] for t in want_ids]  # one response per token, in order
        assert [c.exit_layers for c in got.chunks] == [[d] for d in want_exits]
        assert "".join(c.text for c in got.chunks) == want_text
        assert [c.finish_reason for c in got.chunks] == [""] * (len(want_ids) - 1) + [reason]


def test_http_generate_endpoints(server, local, prompts):
    text = prompts[2]
    want = reference(local, text, 9, threshold=0.3)
    assert answer(client.generate_http(server.http_url, NAME, text, 9, early_exit_threshold=0.3)) == want
    streamed = client.generate_http(server.http_url, NAME, text, 9, stream=True, early_exit_threshold=0.3)
    assert answer(streamed) == want and len(streamed.chunks) == len(want[1])
    with pytest.raises(RequestError, match="max_tokens=0 must be >= 1"):
        client.generate_http(server.http_url, NAME, text, 0)
    # chat requests reach the backend over HTTP too; this model (trained here) has no chat template
    messages = '[{"role": "user", "content": "hi"}]'
    with pytest.raises(RequestError, match="this model's tokenizer has no chat template"):
        client.generate_http(server.http_url, NAME, None, 4, messages=messages)
    with pytest.raises(RequestError, match="send either text_input or messages, not both"):
        client.generate_http(server.http_url, NAME, text, 4, messages=messages)
    with pytest.raises(RequestError, match="messages is not JSON"):
        client.generate_grpc(server.grpc_url, NAME, None, 4, messages="[{")


SETTINGS = [  # (request inputs, in-process GenerationParams fields)
    ({}, {}),
    ({"early_exit_threshold": 0.5}, {"threshold": 0.5}),
    ({"early_exit_threshold": 0.3}, {"threshold": 0.3}),
    ({"exit_policy": "top2_margin", "early_exit_threshold": 0.5}, {"exit_policy": "top2_margin", "threshold": 0.5}),
    ({"exit_policy": "entropy", "early_exit_threshold": 2.5}, {"exit_policy": "entropy", "threshold": 2.5}),
    ({"decode_mode": "full"}, {"decode_mode": "full"}),
    ({"decode_mode": "self_speculative", "num_draft_tokens": 3}, {"decode_mode": "self_speculative", "num_draft": 3}),
    ({"temperature": 0.8, "top_k": 20, "random_seed": 7}, {"temperature": 0.8, "top_k": 20, "seed": 7}),
]


def test_fifty_concurrent_requests_each_get_their_own_answer(server, local, prompts):
    requests = [(prompts[i % len(prompts)], 4 + (i * 7) % 13, i % len(SETTINGS), i % 3 == 0) for i in range(50)]
    wanted = {}
    for text, n, k, _ in requests:
        if (text, n, k) not in wanted:
            wanted[text, n, k] = reference(local, text, n, **SETTINGS[k][1])

    def send(request):
        text, n, k, stream = request
        got = client.generate_grpc(server.grpc_url, NAME, text, n, stream=stream, timeout=120, **SETTINGS[k][0])
        return answer(got)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(send, r) for r in requests]
        done, pending = concurrent.futures.wait(futures, timeout=600)
    assert not pending, f"{len(pending)} of 50 requests unanswered after {time.monotonic() - started:.0f}s"
    results = [f.result() for f in futures]  # raises if any request failed
    for (text, n, k, stream), got in zip(requests, results):
        assert got == wanted[text, n, k], (text, n, SETTINGS[k][0], stream)
    # the requests were decoded together: the backend logs each new peak of its in-flight batch (at most 4 here)
    peaks = [int(m) for m in re.findall(r"in-flight batch: (\d+) sequences", server.log_path.read_text())]
    assert max(peaks) >= 2, peaks


BAD_REQUESTS = [  # (inputs over the request defaults text="…" max_tokens=4, the error the client gets)
    (dict(text_input=None), r"text_input is missing: send the prompt as a BYTES tensor of shape \[1, 1\]"),
    (dict(text_input=""), r"text_input is empty: the prompt needs at least one character"),
    (dict(text_input=b"\xc3\x28 bad"), r"text_input is not valid UTF-8 \(invalid continuation byte at byte 0\)"),
    (dict(max_tokens=0), r"max_tokens=0 must be >= 1"),
    (dict(max_tokens=-7), r"max_tokens=-7 must be >= 1"),
    (dict(max_tokens=32), r"max_tokens=32 is above this model's limit of 31 \(context of 32 positions\)"),
    (dict(early_exit_threshold=-0.25), r"early_exit_threshold -0.25 is outside the range of 'max_prob'"),
    (dict(exit_policy="entropy", early_exit_threshold=float("inf")), r"outside the range of 'entropy'"),
    (dict(exit_policy="fastest"), r"exit_policy 'fastest' is not one of \['max_prob', 'entropy', 'top2_margin'\]"),
    (dict(decode_mode="turbo"), r"decode_mode 'turbo' is not one of \['early_exit', 'self_speculative', 'full'\]"),
    (dict(exit_policy="entropy"), r"exit_policy 'entropy' needs an early_exit_threshold"),
    (dict(decode_mode="self_speculative", draft_exit_layer=3),
     r"draft_exit_layer=3 is not an exit layer of this model \(exits at \[1, 2\]\)"),
    (dict(stop_words=["!!x!!y"]), r"stop word '!!x!!y' is \d+ tokens .*stop words must be single tokens"),
    (dict(text_input="long"), r"the prompt has \d+ tokens; the context holds 32, so at most 31"),
]


def test_bad_requests_get_errors_and_the_server_keeps_serving(server, local, prompts):
    import numpy as np

    long_prompt = "".join(prompts) * 3
    assert len(local[1].encode(long_prompt)) > 32
    for inputs, message in BAD_REQUESTS:
        options = dict(inputs)
        text = options.pop("text_input", prompts[0])
        text = long_prompt if text == "long" else text
        arrays = client.request_arrays(text if text is not None else "x", options.pop("max_tokens", 4), **options)
        if text is None:
            del arrays["text_input"]
        with pytest.raises(RequestError, match=message):
            list(client.stream_grpc(server.grpc_url, NAME, arrays, timeout=60))
    two = client.request_arrays(prompts[0], 4)
    two["text_input"], two["max_tokens"] = np.array([[b"a"], [b"b"]], dtype=object), np.array([[4], [4]], np.int32)
    with pytest.raises(RequestError, match="batch"):  # Triton's check: max_batch_size is 1
        list(client.stream_grpc(server.grpc_url, NAME, two, timeout=60))
    got = client.generate_grpc(server.grpc_url, NAME, prompts[1], 8, stream=True)
    assert answer(got) == reference(local, prompts[1], 8)


def test_self_speculative_and_full_equal_full_greedy(server, local, prompts):
    for text in prompts[:4]:
        full_text, full_ids, _, _ = reference(local, text, 10, decode_mode="full")
        spec = client.generate_grpc(server.grpc_url, NAME, text, 10, decode_mode="self_speculative")
        full = client.generate_grpc(server.grpc_url, NAME, text, 10, decode_mode="full", stream=True)
        assert (spec.text, spec.output_ids) == (full.text, full.output_ids) == (full_text, full_ids)
        assert set(full.exit_layers) == {4} and set(spec.exit_layers) <= {1, 4}
        assert spec.exit_layers == reference(local, text, 10, decode_mode="self_speculative")[2]
        streamed = client.generate_grpc(server.grpc_url, NAME, text, 10, decode_mode="self_speculative", stream=True)
        assert [c.token_ids for c in streamed.chunks] == [[t] for t in spec.output_ids]  # one response per token
        assert (streamed.text, streamed.exit_layers) == (spec.text, spec.exit_layers)


def test_a_client_that_leaves_mid_stream(server, local, prompts):
    stream = client.stream_grpc(server.grpc_url, NAME, client.request_arrays(prompts[3], 30, True, end_id=-1))
    first = next(stream)
    stream.close()  # stops the gRPC stream, cancelling the request
    assert len(first.token_ids) == 1
    assert answer(client.generate_grpc(server.grpc_url, NAME, prompts[4], 5)) == reference(local, prompts[4], 5)


def test_one_session_many_requests(server, local, prompts):
    """A kept connection: answers in turn, an error response and a request left mid-stream do not spoil it."""
    with client.GrpcSession(server.grpc_url) as session:
        for i, text in enumerate(prompts[:3]):
            got = client.generate_grpc(server.grpc_url, NAME, text, 5 + i, stream=i % 2 == 0, session=session)
            assert answer(got) == reference(local, text, 5 + i)
        opened = session._client
        with pytest.raises(RequestError, match=r"max_tokens=0 must be >= 1"):
            client.generate_grpc(server.grpc_url, NAME, prompts[0], 0, session=session)
        got = client.generate_grpc(server.grpc_url, NAME, prompts[3], 6, stream=True, session=session)
        assert answer(got) == reference(local, prompts[3], 6) and session._client is opened  # same stream
        responses = session.stream(NAME, client.request_arrays(prompts[2], 30, True, end_id=-1))
        assert len(next(responses).token_ids) == 1
        responses.close()  # cancels that request: the stream is closed, the next request opens another
        assert session._client is None
        got = client.generate_grpc(server.grpc_url, NAME, prompts[4], 7, session=session)
        assert answer(got) == reference(local, prompts[4], 7)


def test_query_script(server, local, prompts, capsys):
    from nemo_ee.deploy.triton.cli import query_main

    text = prompts[5]
    want_text, want_ids, want_exits, _ = reference(local, text, 7)
    assert query_main([text, "--url", server.grpc_url, "--max-tokens", "7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == text + want_text and out[1].startswith(f"--- {len(want_ids)} tokens, finish=")
    assert query_main([text, "--url", server.http_url, "--protocol", "http", "--max-tokens", "7", "--stream",
                       "--show-exits"]) == 0
    out = capsys.readouterr().out
    from nemo_ee.inference.render import marked_depths, strip_marks

    assert strip_marks(out.splitlines()[0]) == text + want_text and marked_depths(out) == want_exits
    assert query_main([text, "--url", server.grpc_url, "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: max_tokens=0 must be >= 1"


def test_serve_script_starts_and_stops_on_ctrl_c(repository, tmp_path):
    http, grpc = free_ports(2)
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve_triton.py"), "--repository",
                             str(repository), "--http-port", str(http), "--grpc-port", str(grpc), "--log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        lines = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert lines and lines[-1].startswith(f"ready: HTTP 127.0.0.1:{http}, gRPC 127.0.0.1:{grpc}"), "".join(lines)
        client.wait_ready(f"127.0.0.1:{http}", NAME, timeout=30)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest
        assert rest.splitlines()[-2:] == ["stopping tritonserver ...", "stopped"]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "successfully unloaded" in log.read_text() or "Waiting for in-flight requests" in log.read_text()


def test_a_model_that_cannot_load_is_named(repository, tmp_path):
    import shutil

    from nemo_ee.deploy.triton.server import ServerStartError, TritonServer

    broken = tmp_path / "broken"
    shutil.copytree(repository, broken)
    (broken / NAME / "1" / "model.nemo").unlink()
    http, grpc = free_ports(2)
    with pytest.raises(ServerStartError, match=rf"exited with code 1 before it was ready\n  model {NAME}: FileNotFound"
                                               r"Error: no .nemo file at .*/1/model.nemo \(config.pbtxt parameter"):
        TritonServer(broken, http_port=http, grpc_port=grpc).start(timeout=600)
