"""nemo_ee: early-exit LLMs as a NeMo plugin on megatron-core.

torch is pinned but must be installed FIRST (`pip install torch==2.13.0`): with torch already
present the resolver never fetches another (multi-GB CUDA) build. See README.md.
"""
from setuptools import find_packages, setup

# Supported megatron-core range; keep in sync with nemo_ee/compat/mcore.py (SUPPORTED_MCORE).
MCORE = "megatron-core>=0.16.0,<0.20.0"

setup(
    name="nemo_ee",
    version="0.1.0",
    description="Early-exit large language models (EE-LLM, EE-Tuning) on NVIDIA NeMo and megatron-core",
    packages=find_packages(include=["nemo_ee", "nemo_ee.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        MCORE,
        "nemo-toolkit[core]==3.0.0",
        # nemo.core's exp_manager imports these but nemo-toolkit[core] does not declare them
        "einops",
        "sentencepiece",
        "pandas<2.3",
        # as nemo-toolkit 3.0.0 pins / resolves them
        "lightning==2.4.0",
        "omegaconf==2.3.0",
        "hydra-core==1.3.2",
        "numpy==1.26.4",
        "tokenizers>=0.23,<0.24",
        "transformers>=5.23,<5.24",
        "safetensors",
        "tensorboard",
        "tqdm",
        "matplotlib",
        # transformers' GGUF loader (the default real model, SmolLM2, is a GGUF file)
        "gguf>=0.10",
        "accelerate>=1.0",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "triton": ["nvidia-pytriton==0.7.0", "tritonclient[http,grpc]==2.73.0"],
        "gpu": ["transformer-engine[pytorch]"],
    },
)
