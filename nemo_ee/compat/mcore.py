"""Everything that depends on the megatron-core version lives here.

Supported range: SUPPORTED_MCORE (declared in setup.py too). Only 0.16.1 is tested on this
project's CI (CPU, Python 3.11); newer releases are what GPU users on Python 3.12 get.
"""
from __future__ import annotations

from megatron.core import package_info
from megatron.core.transformer.spec_utils import ModuleSpec
from packaging.version import Version

SUPPORTED_MCORE = ">=0.16.0,<0.20.0"
MCORE_VERSION = Version(package_info.__version__)


def check_version() -> None:
    """Raise a clear error when the installed megatron-core is outside the supported range."""
    from packaging.specifiers import SpecifierSet

    if MCORE_VERSION not in SpecifierSet(SUPPORTED_MCORE):
        raise ImportError(
            f"megatron-core {MCORE_VERSION} is not supported by nemo_ee (supported: {SUPPORTED_MCORE})"
        )


def gpt_layer_spec(use_transformer_engine: bool, normalization: str, qk_layernorm: bool = False) -> ModuleSpec:
    """megatron's GPT layer spec: transformer-engine when asked for, else the local (pure PyTorch) one.
    ``qk_layernorm`` (Qwen3): a norm of the layer's normalization type over each head's query and key."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
