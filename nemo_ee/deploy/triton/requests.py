"""Triton request parsing: input tensors -> a validated Job, or a BadRequest naming the bad value and the range."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np


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


def _prompt_text(inputs: Mapping[str, Any]) -> str:
    raw = inputs.get("text_input")
    if raw is None:
        raise BadRequest("text_input is missing: send the prompt as a BYTES tensor of shape [1, 1] "
                         "(or a chat as messages)")
    if np.asarray(raw).size == 0:
        raise BadRequest("text_input is empty: send one prompt (a BYTES tensor of shape [1, 1])")
    if np.asarray(raw).size > 1:
        raise BadRequest(f"text_input holds {np.asarray(raw).size} prompts; send one prompt per request "
                         "(concurrent requests are batched in flight by the server)")
    text = _text("text_input", _one(inputs, "text_input"))
    if not text:
        raise BadRequest("text_input is empty: the prompt needs at least one character")
    return text


def _conversation(inputs: Mapping[str, Any]) -> list:
    """The chat messages of a request (``messages`` JSON, or ``chat`` with text_input as the user message);
    [] for a plain prompt. Checked before any tokenizing."""
    from nemo_ee.data import check_messages

    chat = _one(inputs, "chat")
    raw = _one(inputs, "messages")
    if raw is None:
        return [{"role": "user", "content": _prompt_text(inputs)}] if chat is not None and bool(chat) else []
    if inputs.get("text_input") is not None:
        raise BadRequest("send either text_input or messages, not both")
    try:
        messages = json.loads(_text("messages", raw))
    except json.JSONDecodeError as err:
        raise BadRequest(f"messages is not JSON: {err}") from None
    try:
        return check_messages(messages)
    except ValueError as err:
        raise BadRequest(str(err)) from None


def parse_request(inputs: Mapping[str, Any], tokenizer: Any, model: Any, settings: ServingSettings) -> Job:
    """Validate one request's inputs (``{name: numpy array}``) into a :class:`Job`, or raise :class:`BadRequest`."""
    from nemo_ee.inference.cli import stop_token_ids
    from nemo_ee.inference.generate import DECODE_MODES, GenerationParams, check_prompt
    from nemo_ee.inference.policies import POLICIES, check_threshold

    conversation = _conversation(inputs)
    text = None if conversation else _prompt_text(inputs)

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
                            ("num_draft", "num_draft_tokens", int), ("draft_exit", "draft_exit_layer", int),
                            ("draft_threshold", "draft_threshold", float)):
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

    try:
        prompt = tokenizer.apply_chat_template(conversation) if conversation else tokenizer.encode(text)
        check_prompt(prompt, model)
    except ValueError as err:
        raise BadRequest(str(err)) from None
    stream = _one(inputs, "stream")
    return Job(prompt, params, bool(stream) if stream is not None else False)

