"""Hugging Face transformers checkpoints <-> megatron-core GPTModel state dicts, one adapter per family.

``common`` (safetensors reading, q/k/v layout, rope parsing, the Adapter ABC), ``llama`` (Llama, Mistral,
Qwen2, Qwen3), ``gpt2``, ``convert`` (HF directory -> .nemo). The exporter is :mod:`nemo_ee.checkpoint.hf_export`.
"""
from nemo_ee.checkpoint.hf.common import (
    EXITS_CONFIG,
    EXITS_WEIGHTS,
    MEGATRON_LLAMA3_ROPE,
    Adapter,
    SafetensorsReader,
    qkv_from_megatron,
    qkv_to_megatron,
)
from nemo_ee.checkpoint.hf.convert import (
    ADAPTERS,
    adapter_for,
    convert_hf_state,
    convert_hf_to_nemo,
    is_exit_field,
    load_hf_config,
    main,
    read_exits,
    supported_architectures,
)
from nemo_ee.checkpoint.hf.gpt2 import GPT2Adapter
from nemo_ee.checkpoint.hf.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter

__all__ = [
    "ADAPTERS", "EXITS_CONFIG", "EXITS_WEIGHTS", "MEGATRON_LLAMA3_ROPE", "Adapter", "GPT2Adapter", "LlamaAdapter",
    "MistralAdapter", "Qwen2Adapter", "Qwen3Adapter", "SafetensorsReader", "adapter_for", "convert_hf_state",
    "convert_hf_to_nemo", "is_exit_field", "load_hf_config", "main", "qkv_from_megatron", "qkv_to_megatron",
    "read_exits", "supported_architectures",
]
