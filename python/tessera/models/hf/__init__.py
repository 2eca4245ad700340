"""Hugging Face checkpoints in and out: load_hf, save_hf, read_config."""

from tessera.models.hf.load import config_from_hf_dict, load_hf, read_config
from tessera.models.hf.save import hf_config, save_hf

__all__ = ["config_from_hf_dict", "hf_config", "load_hf", "read_config", "save_hf"]
