"""Model definitions and Hugging Face checkpoints.

Model code never mentions sharding; each family's parallelize.py applies it. Families: llama/ (Llama 3.x,
SmolLM2) and mistral/. `get(name)` gives a named size, `load_hf`/`save_hf` read and write HF directories.
"""

from tessera.models.hf import config_from_hf_dict, hf_config, load_hf, read_config, save_hf
from tessera.models.registry import FAMILIES, ModelSpec, build, get, names

__all__ = ["FAMILIES", "ModelSpec", "build", "config_from_hf_dict", "get", "hf_config", "load_hf", "names", "read_config",
           "save_hf"]
