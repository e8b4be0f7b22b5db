"""The architecture of a plain megatron-core / NeMo-2 GPT checkpoint, as EarlyExitConfig fields, from YAML only.

A distributed checkpoint holds tensors, not the hyper-parameters that give them meaning (head count, norm and
activation type, rotary base ...). They come from, later sources overriding earlier ones:

* a NeMo-2 checkpoint's ``context/model.yaml`` (the GPT config NeMo dumps with every checkpoint; read with
  ``yaml.safe_load``: its ``_target_`` entries are data, nothing is imported or instantiated);
* a nemo_ee arch YAML: a recipe (its ``model.arch`` section, e.g. ``conf/ee_gpt_tiny.yaml``), an ``arch``
  section, or a flat mapping of EarlyExitConfig fields;
* ``KEY=VALUE`` overrides (values parsed as YAML: ``num_query_groups=2``, ``add_bias_linear=false``).

Megatron-LM's ``common.pt`` also holds its training args, but pickled: it is never opened, because unpickling an
untrusted file can run arbitrary code. Exit and parallel-layout fields are dropped: the import has no exits
and is written at TP=PP=1.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from nemo_ee.config import EarlyExitConfig

__all__ = ["REQUIRED", "arch_from_nemo2", "arch_from_yaml", "check_required", "parse_overrides"]

REQUIRED = ("num_layers", "hidden_size", "num_attention_heads")
_FIELDS = {f.name for f in dataclasses.fields(EarlyExitConfig)}
_LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel")
PICKLE_NOTE = ("Megatron-LM's common.pt (pickled training args) is not read: unpickling an untrusted file can "
               "run arbitrary code")

# NeMo-2 / megatron TransformerConfig fields copied as they are (same name and meaning in EarlyExitConfig).
_NEMO2_SAME = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
               "normalization", "layernorm_epsilon", "add_bias_linear", "add_qkv_bias", "position_embedding_type",
               "share_embeddings_and_output_weights", "init_method_std", "vocab_size", "rope_scaling",
               "rope_scaling_factor")
# NeMo-2 fields whose non-default value changes the math in a way EarlyExitConfig cannot express.
_NEMO2_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "rotary_percent": lambda v: v is None or float(v) == 1.0,
    "qk_layernorm": lambda v: not v,
    "num_moe_experts": lambda v: not v,
    "multi_latent_attention": lambda v: not v,
    "apply_residual_connection_post_layernorm": lambda v: not v,
    "layernorm_zero_centered_gamma": lambda v: not v,
    "mtp_num_layers": lambda v: not v,
    "window_size": lambda v: v is None,
    "add_qkv_bias_only": lambda v: not v,
}
# megatron's fixed llama3 rope-scaling constants (NeMo-2 Llama31Config field names).
_LLAMA31 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "old_context_len": 8192}
_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_GELU_TANH = ("openai_gelu", "fast_gelu", "gelu_tanh", "gelu_new", "gelu_pytorch_tanh")


def _yaml(path: str | Path) -> Any:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"arch YAML {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None


def _number(value: Any) -> Any:
    """``"1e-6"`` -> ``1e-06``: YAML 1.1 (PyYAML) reads exponent notation without a dot as a string."""
    return float(value) if isinstance(value, str) and _EXPONENT.match(value.strip()) else value


def _keep(values: Mapping[str, Any], origin: str) -> dict:
    """Known EarlyExitConfig fields of ``values`` minus exit / layout fields; unknown keys are an error."""
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ValueError(f"{origin}: unknown EarlyExitConfig key(s) {unknown}; allowed: {sorted(_FIELDS)}")
    return {k: _number(v) for k, v in values.items()
            if not (k.startswith("exit_") or k == "tie_exit_output" or k in _LAYOUT)}


def arch_from_yaml(path: str | Path) -> dict:
    """EarlyExitConfig fields from a nemo_ee recipe (``model.arch``), an ``arch`` section or a flat mapping."""
    data = _yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of EarlyExitConfig fields, got {type(data).__name__}")
    if isinstance(data.get("model"), dict) and isinstance(data["model"].get("arch"), dict):
        data = data["model"]["arch"]
    elif isinstance(data.get("arch"), dict):
        data = data["arch"]
    return _keep(data, str(path))


def parse_overrides(items: Sequence[str]) -> dict:
    """``["num_layers=4", "add_bias_linear=false"]`` -> EarlyExitConfig fields (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. num_attention_heads=8)")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return _keep(out, "overrides")


def _target(value: Any) -> str:
    """The dotted name of a NeMo-2 serialized callable (``{_target_: torch.nn.functional.silu}``) or string."""
    if isinstance(value, dict):
        value = value.get("_target_", "")
    return str(value or "")


def _activation(config: Mapping[str, Any]) -> dict:
    gated = bool(config.get("gated_linear_unit", False))
    name = _target(config.get("activation_func", "torch.nn.functional.gelu")).rsplit(".", 1)[-1]
    if gated and name == "silu":
        return {"activation": "swiglu"}
    if not gated and name == "gelu":
        return {"activation": "gelu", "gelu_approximate": "none"}
    if not gated and name in _GELU_TANH:
        return {"activation": "gelu", "gelu_approximate": "tanh"}
    raise ValueError(f"activation_func {_target(config.get('activation_func'))!r} with gated_linear_unit={gated} "
                     "is not supported (supported: silu gated = swiglu; gelu, or tanh-GELU such as openai_gelu, "
                     "ungated)")


def arch_from_nemo2(model_yaml: str | Path) -> dict:
    """EarlyExitConfig fields from a NeMo-2 ``context/model.yaml`` (its ``config`` section)."""
    data = _yaml(model_yaml)
    config = data.get("config", data) if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"{model_yaml} has no GPT config mapping (expected a 'config:' section)")
    where = f"{model_yaml} config"
    for key, ok in _NEMO2_UNSUPPORTED.items():
        if key in config and not ok(config[key]):
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported by the importer")
    arch = {k: config[k] for k in _NEMO2_SAME if config.get(k) is not None}
    arch.update(_activation(config))
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    groups = config.get("num_query_groups")
    if groups is not None and groups != heads:
        arch["num_query_groups"] = groups
    kv = config.get("kv_channels")
    if kv is not None and not (heads and hidden and kv * heads == hidden):  # None = hidden_size / heads
        arch["kv_channels"] = kv
    if config.get("rotary_base") is not None:
        base = float(config["rotary_base"])
        if base != int(base):
            raise ValueError(f"{where}: rotary_base={config['rotary_base']!r} is not an integer")
        arch["rotary_base"] = int(base)
    if config.get("scale_factor") is not None:  # Llama31Config: megatron's llama3 rope scaling
        for key, fixed in _LLAMA31.items():
            if key in config and float(config[key]) != fixed:
                raise ValueError(f"{where}: llama3 rope scaling {key}={config[key]!r} cannot be reproduced: "
                                 f"megatron fixes {_LLAMA31}")
        arch.update(rope_scaling=True, rope_scaling_factor=float(config["scale_factor"]))
    if "seq_length" in arch and arch.get("position_embedding_type") != "rope":
        arch["max_position_embeddings"] = arch["seq_length"]
    return _keep(arch, where)


def check_required(arch: Mapping[str, Any], origin: str) -> None:
    """Fail naming the first architecture field no source gave, and how to give it."""
    for key in REQUIRED:
        if arch.get(key) is None:
            raise ValueError(f"the architecture has no {key} ({origin}): pass it as an override ({key}=N) or in "
                             f"an arch YAML (--arch FILE). {PICKLE_NOTE}.")
