"""Hugging Face <-> tessera for the Mistral family. Parameter names are Llama's (MistralForCausalLM has the same
module tree); config.json adds sliding_window and names the Mistral architecture."""

from __future__ import annotations

from tessera.errors import NotSupportedError
from tessera.models.llama.state_dict_adapter import config_kwargs_from_hf, config_to_hf as _llama_config_to_hf
from tessera.models.llama.state_dict_adapter import from_hf, to_hf  # noqa: F401 (the family's name mapping)
from tessera.models.mistral.args import MistralConfig


def config_from_hf(hf: dict, path: str) -> MistralConfig:
    kwargs = config_kwargs_from_hf(hf, path)
    if kwargs["rope_scaling"] is not None:
        raise NotSupportedError(f"{path}: rope scaling is not part of the Mistral family in tessera")
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window") is False:
        window = None
    return MistralConfig(**kwargs, sliding_window=int(window) if window else None)


def config_to_hf(cfg: MistralConfig, dtype_name: str) -> dict:
    out = _llama_config_to_hf(cfg, dtype_name)
    out.pop("rope_scaling", None)
    out.pop("mlp_bias", None)
    out.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=cfg.sliding_window)
    return out
