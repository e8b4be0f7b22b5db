"""What every HF family adapter shares: safetensors reading, q/k/v layout, rope parsing, the Adapter ABC.

One small adapter per model family (torchtitan-style ``state_dict_adapter``): it maps the HF config to
:class:`EarlyExitConfig` fields (rejecting what megatron cannot reproduce) and the HF tensors to
megatron-core ``GPTModel`` state-dict keys. Weights are read with ``safetensors`` only (never
``torch.load``); every tensor's shape is checked against the shape the config implies.

Megatron layout notes:
  * ``linear_qkv`` rows are per query group: for each group, its query heads, then its key head,
    then its value head (``num_heads / num_groups * head_dim + 2 * head_dim`` rows per group);
  * SwiGLU ``linear_fc1`` is ``cat([gate, up])``;
  * RoPE in the local spec is the non-interleaved rotate-half form, as in HF Llama;
  * ``rope_scaling`` implements llama 3.x scaling with low/high frequency factors 1 and 4 and
    8192 original positions, fixed: other llama3 parameters are rejected.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

# megatron's RotaryEmbedding._apply_scaling defaults (megatron-core 0.16), the only llama3 scaling it runs.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Side files of an exported early-exit model (see nemo_ee/checkpoint/hf_export.py): the exit heads' megatron
# tensors (keys ``exits.*``) and the EarlyExitConfig exit fields. Not part of the HF backbone.
EXITS_WEIGHTS = "early_exits.safetensors"
EXITS_CONFIG = "early_exits.json"


# --------------------------------------------------------------------------------------------- reading
class SafetensorsReader:
    """Lazy, shape-checked access to the tensors of every ``*.safetensors`` file in a directory."""

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        files = sorted(f for f in hf_dir.glob("*.safetensors") if f.name != EXITS_WEIGHTS)
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {hf_dir} (pytorch_model.bin is not read: "
                                    "convert it to safetensors first)")
        self._handles: dict[str, Any] = {}
        self._file: dict[str, Path] = {}
        for path in files:
            handle = safe_open(str(path), framework="pt", device="cpu")
            for key in handle.keys():
                if key in self._file:
                    raise ValueError(f"tensor {key!r} appears in both {self._file[key].name} and {path.name}")
                self._handles[key] = handle
                self._file[key] = path
        self.used: set[str] = set()

    def keys(self) -> set[str]:
        """Every tensor name in the directory's safetensors files."""
        return set(self._file)

    def __contains__(self, key: str) -> bool:
        return key in self._file

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``key`` as fp32, after checking it has ``shape`` (marks it used)."""
        if key not in self._file:
            raise KeyError(f"HF checkpoint has no tensor {key!r}")
        actual = tuple(self._handles[key].get_slice(key).get_shape())
        if actual != tuple(shape):
            raise ValueError(f"HF tensor {key!r} ({self._file[key].name}) has shape {list(actual)}, expected "
                             f"{list(shape)} from config.json")
        self.used.add(key)
        return self._handles[key].get_tensor(key).to(torch.float32)


def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
                    head_dim: int) -> torch.Tensor:
    """Separate q/k/v projections (weights [out, in] or biases [out]) -> megatron's per-group linear_qkv."""
    tail = q.shape[1:]
    q = q.reshape(groups, heads // groups * head_dim, *tail)
    k = k.reshape(groups, head_dim, *tail)
    v = v.reshape(groups, head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail).contiguous()


def qkv_from_megatron(qkv: torch.Tensor, heads: int, groups: int,
                      head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_to_megatron`: megatron's per-group linear_qkv -> (q, k, v), each contiguous."""
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, heads // groups * head_dim + 2 * head_dim, *tail).split(
        [heads // groups * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def _rope_parameters(a: dict) -> dict:
    """Inverse of :func:`_rope`: HF ``rope_parameters`` of the arch's rotary fields."""
    params: dict[str, Any] = {"rope_theta": float(a.get("rotary_base", 10000))}
    if a.get("rope_scaling"):
        params.update(rope_type="llama3", factor=float(a.get("rope_scaling_factor", 8.0)), **MEGATRON_LLAMA3_ROPE)
    else:
        params["rope_type"] = "default"
    return params


def _need(hf: dict, key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}")
    return hf[key]


def _reject(hf: dict, family: str, **allowed: Any) -> None:
    """Fail on HF options whose value changes the math in a way megatron's GPTModel does not implement."""
    for key, ok in allowed.items():
        value = hf.get(key, ok if not callable(ok) else None)
        good = ok(value) if callable(ok) else value == ok
        if not good:
            raise ValueError(f"{family}: config.json {key}={value!r} is not supported by the importer")


def _rotary_base(theta: Any) -> int:
    if float(theta) != int(float(theta)):
        raise ValueError(f"rope_theta={theta!r} is not an integer; megatron's rotary_base is an int")
    return int(float(theta))


def _rope(hf: dict, family: str) -> dict:
    """rotary_base / rope_scaling fields from either ``rope_theta`` + ``rope_scaling`` or ``rope_parameters``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rotary_base": _rotary_base(theta)}
    if rope_type in (None, "default"):
        return out
    if rope_type != "llama3":
        raise ValueError(f"{family}: rope scaling of type {rope_type!r} is not supported (megatron implements "
                         "only 'llama3' scaling)")
    for key, expected in MEGATRON_LLAMA3_ROPE.items():
        if float(merged.get(key, float("nan"))) != expected:
            raise ValueError(
                f"{family}: llama3 rope scaling {key}={merged.get(key)!r} cannot be reproduced: megatron's "
                f"rope scaling fixes {MEGATRON_LLAMA3_ROPE}"
            )
    out.update(rope_scaling=True, rope_scaling_factor=float(_need(merged, "factor")))
    return out


# --------------------------------------------------------------------------------------------- adapters
class Adapter(ABC):
    """One HF model family: config mapping and tensor mapping, both directions."""

    name = ""
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()  # config.json ``model_type`` values (when it lists no architectures)
    ignored = re.compile(r"$^")  # HF keys that are buffers, not parameters

    @abstractmethod
    def arch(self, hf: dict) -> dict:
        """EarlyExitConfig fields of the HF ``config.json`` dict (raises on what megatron cannot reproduce)."""

    @abstractmethod
    def convert(self, read: SafetensorsReader, arch: dict) -> dict[str, torch.Tensor]:
        """megatron GPTModel state dict from the HF tensors (each shape-checked by ``read``)."""

    # ---- export (megatron -> HF), the inverse of arch/convert
    @abstractmethod
    def unsupported(self, arch: dict) -> list[str]:
        """Reasons this family cannot represent ``arch`` (empty = it can)."""

    @abstractmethod
    def hf_config(self, arch: dict) -> dict:
        """HF ``config.json`` dict for ``arch`` (inverse of :meth:`arch`)."""

    @abstractmethod
    def export(self, state: dict[str, torch.Tensor], arch: dict) -> dict[str, torch.Tensor]:
        """HF tensors from a megatron state dict (inverse of :meth:`convert`)."""


def _mismatch(arch: dict, **want: Any) -> list[str]:
    return [f"{k}={arch.get(k)!r} (needs {v!r})" for k, v in want.items() if arch.get(k) != v]
