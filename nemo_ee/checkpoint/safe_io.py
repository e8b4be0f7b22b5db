"""Lightning resume checkpoints loaded with ``weights_only=True``: no arbitrary unpickling.

Lightning's default ``TorchCheckpointIO`` loads with ``weights_only=False``. Ours allows only tensors,
plain containers and the OmegaConf classes NeMo stores as hyper-parameters.
"""
from __future__ import annotations

import collections
import typing
from typing import Any, Callable, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

SAFE_GLOBALS = [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, dict, list, int,
                collections.defaultdict]


class SafeTorchCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose load refuses anything but tensors, containers and OmegaConf nodes."""

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage) -> dict:
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"checkpoint file {path} does not exist")
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(str(path), map_location=map_location, weights_only=True)
