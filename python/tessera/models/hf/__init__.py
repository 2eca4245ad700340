"""Hugging Face checkpoints in and out: load_hf, save_hf, read_config."""

from tessera.models.hf.load import load_hf, read_config
from tessera.models.hf.save import save_hf

__all__ = ["load_hf", "read_config", "save_hf"]
