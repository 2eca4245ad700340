"""Asynchronous, verifiable, resharding checkpoints (format: docs/checkpoint_format.md)."""

from tessera.checkpoint.checkpointer import Checkpointer, SaveHandle
from tessera.checkpoint.safetensors_io import export_safetensors, import_safetensors
from tessera.checkpoint.state import RNGState

__all__ = ["Checkpointer", "RNGState", "SaveHandle", "export_safetensors", "import_safetensors"]
