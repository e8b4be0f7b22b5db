"""Checkpoint I/O: safe Lightning resume loading (safe_io), distributed checkpoints and resharding (dist, reshard),
HF transformers import/export (hf, hf_export), plain megatron-core / NeMo-2 dist checkpoint import (megatron_dist,
megatron_arch), and the .nemo writer every importer shares (nemo_file)."""
