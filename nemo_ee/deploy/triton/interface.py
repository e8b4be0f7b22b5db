"""The model's tensor interface: TensorRT-LLM's Triton names where they exist, early-exit inputs besides.

Every request carries one prompt (``max_batch_size: 1``, so tensors are sent with a leading batch dimension
of 1: ``text_input`` has shape ``[1, 1]``). Concurrent requests are batched by the backend itself, in flight.

With ``stream`` true the model sends one response per generated token (``output_ids`` / ``exit_layers`` of
that token, ``text_output`` the text it adds); otherwise one response with the whole generation.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output: Triton datatype name, dims without the batch dimension, whether optional."""

    name: str
    dtype: str  # "BYTES", "INT32", "UINT64", "FP32", "BOOL" (tritonclient's names)
    dims: tuple = (1,)
    optional: bool = True
    doc: str = ""

    @property
    def config_type(self) -> str:
        """The config.pbtxt data_type (BYTES is TYPE_STRING there)."""
        return "TYPE_STRING" if self.dtype == "BYTES" else f"TYPE_{self.dtype}"


INPUTS = (
    TensorSpec("text_input", "BYTES", doc="the prompt, UTF-8 (required unless messages is sent)"),
    TensorSpec("messages", "BYTES", doc="a chat: JSON list of {role, content}, put through the model's chat "
                                        "template (instead of text_input)"),
    TensorSpec("chat", "BOOL", doc="true: text_input is one user message, put through the chat template"),
    TensorSpec("max_tokens", "INT32", optional=False, doc="new tokens to generate, 1..max_tokens_limit"),
    TensorSpec("stream", "BOOL", doc="one response per token (default false: one final response)"),
    TensorSpec("temperature", "FP32", doc="0 (default): greedy"),
    TensorSpec("top_k", "INT32", doc="0 (default): off"),
    TensorSpec("top_p", "FP32", doc="1 (default): off"),
    TensorSpec("random_seed", "UINT64", doc="sampling seed (default 0)"),
    TensorSpec("stop_words", "BYTES", dims=(-1,), doc="strings that end the generation (single tokens)"),
    TensorSpec("end_id", "INT32", doc="end token id (default: the model's own end ids; -1: none)"),
    TensorSpec("early_exit_threshold", "FP32", doc="one threshold for every exit (replaces calibrated ones)"),
    TensorSpec("exit_policy", "BYTES", doc="max_prob | entropy | top2_margin"),
    TensorSpec("decode_mode", "BYTES", doc="early_exit | self_speculative | full"),
    TensorSpec("num_draft_tokens", "INT32", doc="self_speculative: tokens drafted per verification"),
    TensorSpec("draft_exit_layer", "INT32", doc="self_speculative: the exit layer that drafts"),
    TensorSpec("draft_threshold", "FP32", doc="self_speculative: stop drafting below this max probability"),
)

OUTPUTS = (
    TensorSpec("text_output", "BYTES", dims=(-1,), doc="generated text (stream: the text this token adds)"),
    TensorSpec("output_ids", "INT32", dims=(-1,), doc="generated token ids (stream: this token)"),
    TensorSpec("exit_layers", "INT32", dims=(-1,), doc="per token, the backbone layers it ran (its exit)"),
    TensorSpec("finish_reason", "BYTES", dims=(1,), doc="stop | length | context (only in the last response)"),
)

INPUT_BY_NAME = {spec.name: spec for spec in INPUTS}
OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)

# config.pbtxt parameters the backend reads (the exporter writes them; '' means unset).
PARAMETERS = {
    "checkpoint": "the .nemo, relative to the model version directory or absolute",
    "python_path": "':'-separated entries model.py puts first on sys.path (venv site-packages, repo)",
    "exit_policy": "default exit policy ('' : the .nemo's calibrated one, else max_prob)",
    "early_exit_threshold": "default threshold for every exit ('' : the .nemo's calibrated thresholds)",
    "exit_thresholds": "default per-exit thresholds as JSON {layer: threshold} ('' : the .nemo's)",
    "decode_mode": "default decode mode (early_exit)",
    "max_inflight": "sequences decoded together by the in-flight batcher",
    "max_tokens_limit": "largest max_tokens a request may ask for ('' : context length - 1)",
    "num_threads": "torch intra-op threads in the backend (0: torch's default)",
}
