"""The model registry: families (keyed by HF model_type) and named sizes.

    spec = tessera.models.get("smollm2-135m")      # a ModelSpec: config, family, build()
    model = spec.build(device="meta")
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from tessera.errors import InvalidArgumentError
from tessera.models.llama import args as llama_args
from tessera.models.llama.parallelize import parallelize as llama_parallelize
from tessera.models.llama import state_dict_adapter as llama_adapter
from tessera.models.llama.model import Llama
from tessera.models.mistral import args as mistral_args
from tessera.models.mistral import state_dict_adapter as mistral_adapter
from tessera.models.mistral.model import Mistral


@dataclass(frozen=True)
class Family:
    """One model family: its config class, module class, how tessera shards it (`parallelize(model, *, group,
    strategy, mixed_precision, before_shard)`), its HF adapter module (to_hf, from_hf, config_from_hf,
    config_to_hf), and its named sizes with their published parameter counts."""

    name: str
    config_cls: type
    model_cls: type
    parallelize: Callable
    adapter: types.ModuleType
    configs: dict
    published_params: dict


FAMILIES = {
    "llama": Family("llama", llama_args.LlamaConfig, Llama, llama_parallelize, llama_adapter,
                    llama_args.LLAMA_CONFIGS, llama_args.PUBLISHED_PARAMS),
    "mistral": Family("mistral", mistral_args.MistralConfig, Mistral, llama_parallelize, mistral_adapter,
                      mistral_args.MISTRAL_CONFIGS, mistral_args.PUBLISHED_PARAMS),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    config: llama_args.LlamaConfig
    published_params: int | None

    def build(self, *, device=None, dtype: torch.dtype | None = None) -> nn.Module:
        """The module with default (random) initialisation; device="meta" allocates nothing."""
        return build(self.config, device=device, dtype=dtype)


def family_of(config) -> Family:
    fam = FAMILIES.get(getattr(config, "family", None))
    if fam is None or not isinstance(config, fam.config_cls):
        raise InvalidArgumentError(f"{type(config).__name__} is not the config of a registered model family "
                                   f"({sorted(FAMILIES)})")
    return fam


def build(config, *, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """The family's module for `config` on `device` ("meta": shapes only, nothing allocated)."""
    fam = family_of(config)
    with torch.device(device or "cpu"):
        model = fam.model_cls(config)
    return model.to(dtype) if dtype is not None else model


def names() -> list[str]:
    return sorted(n for fam in FAMILIES.values() for n in fam.configs)


def get(name: str) -> ModelSpec:
    """The named size `name` (see names()); InvalidArgumentError naming the known ones otherwise."""
    for fam in FAMILIES.values():
        if name in fam.configs:
            return ModelSpec(name, fam, fam.configs[name](), fam.published_params.get(name))
    raise InvalidArgumentError(f"unknown model '{name}'; known: {', '.join(names())}")
