"""The backend without Triton: request validation, the decode loop (in-flight batching), the response adapter."""
import string
import threading
import types

import numpy as np
import pytest

from nemo_ee.deploy.triton.backend import BadRequest, DecodeService, Job, ServingSettings, TritonBackend, parse_request
from nemo_ee.deploy.triton.client import request_arrays
from nemo_ee.inference.generate import GenerationParams, generate

ALPHABET = string.ascii_letters + string.digits + " ."  # 64 one-character tokens


class CharTokenizer:
    """One token per character of ALPHABET; the end-of-text token is '.' (id 63)."""

    eos_id = 63
    eos_ids = (63,)

    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(ALPHABET[i] for i in ids if not (skip_special_tokens and i == self.eos_id))


def fake_model(context=32, exits=(1, 2, 3), layers=4, vocab=64):
    return types.SimpleNamespace(
        ee_config=types.SimpleNamespace(max_positions=context, vocab_size=vocab, exit_layer_nums=list(exits),
                                        num_layers=layers),
        exits={str(i): types.SimpleNamespace(point=layer) for i, layer in enumerate(exits)})


CALIBRATED = {"exit_policy": "max_prob", "exit_thresholds": {1: 0.9, 2: 0.8}}


def settings(model, defaults=CALIBRATED, **parameters):
    return ServingSettings.from_parameters(parameters, model, defaults)


def parse(text="abc", max_tokens=4, model=None, defaults=CALIBRATED, **options):
    model = model or fake_model()
    return parse_request(request_arrays(text, max_tokens, **options), CharTokenizer(), model, settings(model, defaults))


def test_parse_maps_the_tensor_interface():
    job = parse("abc", 5)
    assert job.prompt_ids == [0, 1, 2] and not job.stream
    p = job.params
    assert (p.max_tokens, p.exit_policy, p.exit_thresholds, p.threshold) == (5, "max_prob", {1: 0.9, 2: 0.8}, None)
    assert p.stop_token_ids == (63,) and p.decode_mode == "early_exit"  # stops at end-of-text by default
    job = parse("ab", 3, stream=True, early_exit_threshold=0.5, temperature=0.7, top_k=5, top_p=0.9, random_seed=11,
                stop_words=["x", "y"], end_id=-1)
    p = job.params
    assert job.stream and (p.threshold, p.exit_thresholds) == (0.5, None)  # a request threshold replaces calibration
    assert (p.temperature, p.top_k, round(p.top_p, 5), p.seed) == (pytest.approx(0.7), 5, 0.9, 11)
    assert p.stop_token_ids == (ALPHABET.index("x"), ALPHABET.index("y"))
    p = parse("ab", 3, exit_policy="entropy", early_exit_threshold=2.0).params
    assert (p.exit_policy, p.threshold) == ("entropy", 2.0)
    p = parse("ab", 3, decode_mode="self_speculative", num_draft_tokens=3, draft_exit_layer=2, end_id=5).params
    assert (p.decode_mode, p.num_draft, p.draft_exit, p.stop_token_ids) == ("self_speculative", 3, 2, (5,))
    assert parse("ab", 3, decode_mode="self_speculative", draft_threshold=0.5).params.draft_threshold == 0.5
    assert parse("ab", 3, decode_mode="full", exit_policy="entropy").params.decode_mode == "full"
    assert parse("ab", 3, defaults={}).params.rule([1, 2, 3]).threshold is None  # nothing calibrated: full depth
    # one request in tensors of shape [1, 1] or [1]
    job = parse_request({"text_input": np.array([b"ab"], dtype=object), "max_tokens": np.array([2], np.int32)},
                        CharTokenizer(), fake_model(), settings(fake_model()))
    assert job.prompt_ids == [0, 1] and job.params.max_tokens == 2


@pytest.mark.parametrize("inputs,message", [
    (dict(text=None), r"text_input is missing"),
    (dict(text=""), r"text_input is empty: the prompt needs at least one character"),
    (dict(text=b"\xff\xfeab"), r"text_input is not valid UTF-8 \(invalid start byte at byte 0\)"),
    (dict(max_tokens=None), r"max_tokens is missing"),
    (dict(max_tokens=0), r"max_tokens=0 must be >= 1"),
    (dict(max_tokens=-3), r"max_tokens=-3 must be >= 1"),
    (dict(max_tokens=32), r"max_tokens=32 is above this model's limit of 31 \(context of 32 positions\)"),
    (dict(early_exit_threshold=-0.5), r"early_exit_threshold -0.5 is outside the range of 'max_prob'"),
    (dict(early_exit_threshold=float("nan")),
     r"early_exit_threshold nan is outside the range of 'max_prob': a finite number >= 0"),
    (dict(exit_policy="entropy", early_exit_threshold=-1.0), r"outside the range of 'entropy'"),
    (dict(exit_policy="fastest"), r"exit_policy 'fastest' is not one of \['max_prob', 'entropy', 'top2_margin'\]"),
    (dict(decode_mode="turbo"), r"decode_mode 'turbo' is not one of \['early_exit', 'self_speculative', 'full'\]"),
    (dict(exit_policy="entropy"), r"exit_policy 'entropy' needs an early_exit_threshold: this model's default "
                                  r"thresholds are for 'max_prob'"),
    (dict(text="a" * 32), r"the prompt has 32 tokens; the context holds 32, so at most 31"),
    (dict(stop_words=["ab"]), r"stop word 'ab' is 2 tokens \[0, 1\]; stop words must be single tokens"),
    (dict(end_id=64), r"end_id=64 is outside the vocabulary 0..63 \(-1: no end token\)"),
    (dict(temperature=-1.0), r"temperature=-1.0 must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(decode_mode="self_speculative", draft_exit_layer=4),
     r"draft_exit_layer=4 is not an exit layer of this model \(exits at \[1, 2, 3\]\)"),
    (dict(decode_mode="self_speculative", num_draft_tokens=0), r"num_draft_tokens=0 must be an integer >= 1"),
    (dict(decode_mode="self_speculative", draft_threshold=1.5),
     r"draft_threshold=1.5 must be a max probability in 0..1 \(or None\)"),
])
def test_bad_requests_are_named(inputs, message):
    kwargs = dict(text="abc", max_tokens=4)
    kwargs.update(inputs)
    text, max_tokens = kwargs.pop("text"), kwargs.pop("max_tokens")
    arrays = request_arrays(text if text is not None else "x", max_tokens if max_tokens is not None else 1, **kwargs)
    if text is None:
        del arrays["text_input"]
    if max_tokens is None:
        del arrays["max_tokens"]
    model = fake_model()
    with pytest.raises(BadRequest, match=message):
        parse_request(arrays, CharTokenizer(), model, settings(model))


def test_two_prompts_in_one_request():
    arrays = {"text_input": np.array([[b"ab"], [b"cd"]], dtype=object), "max_tokens": np.array([[2], [2]], np.int32)}
    with pytest.raises(BadRequest, match="text_input holds 2 prompts; send one prompt per request"):
        parse_request(arrays, CharTokenizer(), fake_model(), settings(fake_model()))


def test_settings_from_config_parameters():
    model = fake_model()
    s = settings(model)
    assert (s.defaults, s.max_tokens_limit, s.context, s.max_inflight) == (CALIBRATED, 31, 32, 8)
    s = settings(model, early_exit_threshold="0.7", max_tokens_limit="16", max_inflight="3", decode_mode="full")
    assert s.defaults == {"exit_policy": "max_prob", "threshold": 0.7, "decode_mode": "full"}
    assert (s.max_tokens_limit, s.max_inflight) == (16, 3)
    s = settings(model, exit_thresholds='{"3": 0.5}')
    assert s.defaults == {"exit_policy": "max_prob", "exit_thresholds": {3: 0.5}}
    assert settings(model, exit_policy="entropy").defaults == {"exit_policy": "entropy"}  # calibrated for max_prob
    with pytest.raises(ValueError, match="config parameter exit_policy 'x' is not one of"):
        settings(model, exit_policy="x")
    with pytest.raises(ValueError, match=r"config parameter max_tokens_limit=40 is outside 1..31"):
        settings(model, max_tokens_limit="40")
    with pytest.raises(ValueError, match=r"active exit layers \[5\] are not exits of this model"):
        settings(model, exit_thresholds='{"5": 0.5}')
    with pytest.raises(ValueError, match="outside the range of 'max_prob'"):
        settings(model, early_exit_threshold="-1")


# ---------------------------------------------------------------------------------------------- decode loop
@pytest.fixture(scope="module")
def model():
    from nemo_ee.parallel.initialize import initialize_distributed
    from tests.inference.conftest import train_model

    initialize_distributed(1, 1, seed=1234)
    return train_model()  # 64 tokens, exits after layers 1, 2 and 3 of 4, context 48


def alone(model, prompt, params):
    return generate(model, [prompt], params)[0]


class Collector:
    """A sink per request that records the updates (thread-safe) and signals the last one."""

    def __init__(self):
        self.updates, self.done = [], threading.Event()

    def __call__(self, update):
        self.updates.append(update)
        if update.finished or update.error:
            self.done.set()


def test_concurrent_jobs_join_the_batch_and_match_alone(model):
    import torch

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 3, 5, 8, 2, 6, 4, 7, 9, 3)]
    variants = [dict(threshold=0.2), dict(threshold=0.5), dict(exit_policy="entropy", threshold=2.0),
                dict(decode_mode="full"), dict(decode_mode="self_speculative", num_draft=3),
                dict(temperature=0.9, top_k=10, seed=5, threshold=0.3)]
    jobs = [Job(p, GenerationParams(max_tokens=5 + i % 7, **variants[i % len(variants)]), stream=i % 2 == 0)
            for i, p in enumerate(prompts)]
    service = DecodeService(model, CharTokenizer(), max_inflight=3)
    sinks = [Collector() for _ in jobs]
    for job, sink in zip(jobs[:5], sinks[:5]):  # queued before the loop starts: the first step fills all 3 rows
        service.submit(job, sink)
    service.start()
    try:  # the others arrive from other threads while those decode, and join at token boundaries
        threads = [threading.Thread(target=service.submit, args=(job, sink)) for job, sink in zip(jobs[5:], sinks[5:])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(sink.done.wait(60) for sink in sinks)
    finally:
        service.stop()
    depths, total = set(), 0
    for job, sink in zip(jobs, sinks):
        ref = alone(model, job.prompt_ids, job.params)
        assert [u.error for u in sink.updates] == [None] * len(sink.updates)
        ids = [t for u in sink.updates for t in u.token_ids]
        exits = [d for u in sink.updates for d in u.exit_layers]
        assert (ids, exits) == (ref.token_ids, ref.exit_layers)
        if job.stream:  # one update per token, in order, the last one final with the reason
            assert [len(u.token_ids) for u in sink.updates] == [1] * len(ref.token_ids)
            assert [u.finished for u in sink.updates] == [False] * (len(ids) - 1) + [True]
            assert "".join(u.text for u in sink.updates) == CharTokenizer().decode(ref.token_ids, True)
        else:
            assert len(sink.updates) == 1 and sink.updates[0].text == CharTokenizer().decode(ref.token_ids, True)
        assert sink.updates[-1].finish_reason == ref.finish_reason
        depths |= set(exits)
        total += len(ids)
    assert {1, 4} <= depths  # early and full-depth tokens both went through the loop
    stats = service.stats
    speculative = sum(job.params.decode_mode == "self_speculative" for job in jobs)
    assert stats["max_rows"] == 3 and stats["speculative"] == speculative == 1 and stats["requests"] == len(jobs)
    assert stats["tokens"] == total


def test_clients_that_go_away_and_shutdown(model):
    service = DecodeService(model, CharTokenizer(), max_inflight=2).start()
    gone, cancelled, fine = Collector(), Collector(), Collector()
    flag = threading.Event()

    def broken(update):
        gone.updates.append(update)
        raise ConnectionError("client closed the stream")

    try:
        params = GenerationParams(max_tokens=30, threshold=0.3)
        service.submit(Job([1, 2, 3], params, stream=True), broken)
        service.submit(Job([4, 5], params, stream=True), cancelled, cancelled=flag.is_set)
        flag.set()
        service.submit(Job([6, 7, 8], GenerationParams(max_tokens=6), stream=False), fine)
        assert fine.done.wait(60)
    finally:
        service.stop()
    assert len(gone.updates) == 1  # its first send failed: it left the batch
    assert not cancelled.updates or not cancelled.updates[-1].finished  # dropped before its end
    assert fine.updates[-1].token_ids == alone(model, [6, 7, 8], GenerationParams(max_tokens=6)).token_ids
    assert service.stats["cancelled"] == 2
    late = Collector()
    with pytest.raises(RuntimeError, match="the decode loop has stopped"):
        service.submit(Job([1], GenerationParams(max_tokens=2)), late)


def test_a_slow_client_does_not_stall_decoding(model):
    """Sends happen on the responder thread: decoding runs ahead while a sink is slow (Triton's send is a round trip)."""
    import time

    service = DecodeService(model, CharTokenizer(), max_inflight=2).start()
    seen_tokens, slow = [], Collector()

    def sluggish(update):
        time.sleep(0.5 if not slow.updates else 0.0)
        seen_tokens.append(service.stats["tokens"])  # tokens decoded by the time this send returns
        slow(update)

    params = GenerationParams(max_tokens=12, threshold=0.3)
    try:
        service.submit(Job([1, 2, 3], params, stream=True), sluggish)
        assert slow.done.wait(60)
    finally:
        service.stop()
    ref = alone(model, [1, 2, 3], params)
    assert [t for u in slow.updates for t in u.token_ids] == ref.token_ids  # in order, none lost
    assert seen_tokens[0] == len(ref.token_ids) == 12  # all decoded while the first send was still waiting
    assert service.stats["responder_sent"] == 12


def test_stop_answers_pending_requests(model):
    service = DecodeService(model, CharTokenizer())  # never started: everything stays queued
    sink = Collector()
    service.submit(Job([1, 2], GenerationParams(max_tokens=3)), sink)
    service.stop()
    assert [u.error for u in sink.updates] == ["the model is being unloaded; the request was not finished"]


# ---------------------------------------------------------------------------------------------- Triton adapter
class FakePbUtils:
    """The parts of triton_python_backend_utils the adapter uses."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class TritonError:
        def __init__(self, message):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs = {t.name: t.array for t in output_tensors}
            self.error = error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        array = request.arrays.get(name)
        return None if array is None else FakePbUtils.Tensor(name, array)


class FakeRequest:
    def __init__(self, arrays):
        self.arrays, self.sent, self.done = arrays, [], threading.Event()

    def get_response_sender(self):
        return self

    def send(self, response, flags=0):
        self.sent.append((response, flags))
        if flags:
            self.done.set()


def test_adapter_sends_tensors_and_errors(model):
    backend = TritonBackend(FakePbUtils)
    backend.model, backend.tokenizer = model, CharTokenizer()
    backend.settings = ServingSettings.from_parameters({}, model, {})
    backend.service = DecodeService(model, backend.tokenizer).start()
    good = FakeRequest(request_arrays("abc", 4, stream=True))
    whole = FakeRequest(request_arrays("abc", 4))
    bad = FakeRequest(request_arrays("abc", 0))
    try:
        assert backend.execute([good, bad, whole]) is None
        assert all(r.done.wait(60) for r in (good, bad, whole))
    finally:
        backend.finalize()
    ref = alone(model, [0, 1, 2], GenerationParams(max_tokens=4, stop_token_ids=(63,)))
    assert [flags for _, flags in good.sent] == [0] * (len(ref.token_ids) - 1) + [1]
    outputs = [r.outputs for r, _ in good.sent]
    assert [int(o["output_ids"][0, 0]) for o in outputs] == ref.token_ids
    assert [int(o["exit_layers"][0, 0]) for o in outputs] == ref.exit_layers
    assert outputs[0]["text_output"].shape == (1, 1) and outputs[-1]["finish_reason"][0, 0] == b"length"
    (response, flags), = whole.sent
    assert flags == 1 and response.outputs["output_ids"].shape == (1, len(ref.token_ids))
    assert response.outputs["text_output"][0, 0].decode() == CharTokenizer().decode(ref.token_ids, True)
    (response, flags), = bad.sent
    assert flags == 1 and response.error.message == "max_tokens=0 must be >= 1" and not response.outputs


def test_request_arrays_follow_the_interface():
    arrays = request_arrays("hi", 3, stream=True, stop_words=["a", "b"], early_exit_threshold=0.5,
                            random_seed=7, exit_policy="entropy", top_k=None)
    assert arrays["text_input"].shape == (1, 1) and arrays["text_input"].dtype == object
    assert arrays["max_tokens"].dtype == np.int32 and arrays["stream"].dtype == np.bool_
    assert arrays["stop_words"].shape == (1, 2) and arrays["random_seed"].dtype == np.uint64
    assert arrays["early_exit_threshold"].dtype == np.float32 and "top_k" not in arrays
    with pytest.raises(ValueError, match="unknown input 'threshold'"):
        request_arrays("hi", 3, threshold=0.5)
