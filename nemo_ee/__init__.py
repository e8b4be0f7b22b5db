"""nemo_ee: early-exit large language models on megatron-core and NeMo."""

__version__ = "0.1.0"
