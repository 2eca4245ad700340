"""load_hf: a Hugging Face model directory (config.json + safetensors) -> a tessera module, plain or sharded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from tessera.errors import InvalidArgumentError
from tessera.models.hf.safetensors_files import WeightIndex
from tessera.models.registry import FAMILIES, Family, build, family_of


def config_from_hf_dict(hf: dict, where: str):
    """The tessera config for an HF config.json dict (`where` names its source in errors)."""
    model_type = hf.get("model_type")
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise InvalidArgumentError(f"{where}: model_type {model_type!r} is not supported; expected one of "
                                   f"{sorted(FAMILIES)}")
    return fam.adapter.config_from_hf(hf, where)


def read_config(model_dir: str | os.PathLike):
    """The tessera config (LlamaConfig or MistralConfig) of an HF model directory, from its config.json.
    InvalidArgumentError for a missing directory or file, or an unknown model_type; NotSupportedError for
    features tessera's decoder lacks."""
    d = Path(model_dir)
    if not d.is_dir():
        raise InvalidArgumentError(f"{d}: not a directory (expected a Hugging Face model directory with "
                                   "config.json and safetensors weights)")
    path = d / "config.json"
    if not path.is_file():
        raise InvalidArgumentError(f"{d}: no config.json (expected a Hugging Face model directory)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise InvalidArgumentError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf_dict(hf, str(path))


# The config.json fields transformers' GenerationConfig.from_model_config takes when a directory has no
# generation_config.json; a generation_config.json overrides them field by field.
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_generation_config(model_dir: str | os.PathLike | None, hf: dict | None = None) -> dict:
    """The generation defaults of an HF model directory as a plain dict: config.json's bos/eos/pad token ids that
    are set, overridden by generation_config.json's fields when the directory has one (as transformers'
    from_pretrained reads them). `hf`: config.json's dict, if already read; model_dir None: `hf` alone (a
    checkpoint's config). A chat model's end-of-turn id is often an eos_token_id only in generation_config.json
    (Llama 3: [128001, 128008, 128009]). InvalidArgumentError for a generation_config.json that is not a JSON
    object."""
    if model_dir is None:
        return {k: hf[k] for k in _TOKEN_ID_FIELDS if hf.get(k) is not None}
    d = Path(model_dir)
    if hf is None:
        hf = _json_object(d / "config.json") if (d / "config.json").is_file() else {}
    out = {k: hf[k] for k in _TOKEN_ID_FIELDS if hf.get(k) is not None}
    if (d / "generation_config.json").is_file():
        out.update(_json_object(d / "generation_config.json"))
    return out


def _json_object(f: Path) -> dict:
    try:
        value = json.loads(f.read_text())
    except ValueError as e:
        raise InvalidArgumentError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{f}: expected a JSON object, got {type(value).__name__}")
    return value


def expected_params(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """tessera name -> full shape of every parameter (a tied one once, under its first name)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _check_weights(fam: Family, index: WeightIndex, expected: dict[str, tuple[int, ...]], tied: bool) -> dict:
    """tessera name -> HF key, after checking that the files hold exactly the expected tensors at the expected
    shapes; InvalidArgumentError naming the missing, unexpected or mis-shaped keys."""
    where = index.dir
    hf_of, unexpected = {}, []
    for key in index.file_of:
        name = fam.adapter.from_hf(key)
        if name is None or (name not in expected and not (tied and name == "output.weight")):
            unexpected.append(key)
        elif name in expected:
            hf_of[name] = key
    missing = [fam.adapter.to_hf(n) for n in expected if n not in hf_of]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    for name, key in hf_of.items():
        if index.shape[key] != expected[name]:
            problems.append(f"'{key}' has shape {index.shape[key]}, but config.json implies {expected[name]}")
    if problems:
        raise InvalidArgumentError(f"{where}: the weights do not match config.json ({fam.name}): "
                                   + "; ".join(problems[:6]))
    return hf_of


def _few(keys: list[str]) -> str:
    return ", ".join(f"'{k}'" for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def fill_from(index: WeightIndex, hf_of: dict, prefix_of: dict[int, str], *, dtype, device):
    """A before_shard/materialize callback: replaces every meta parameter directly in `module` (and its
    unsharded submodules) by the tensor read from the files, converted to `dtype` on `device`. Tied parameters
    are replaced at every location, so they stay one tensor. Reads one tensor at a time, so a module's weights
    are never held twice.

    Parameters the files do not hold (added by load_hf's `adapt`, e.g. LoRA adapters) are left to their module's
    `materialize_meta()` method, called after the module's own weights are filled; InvalidArgumentError names a
    parameter that stays on the meta device."""

    def fill(module: nn.Module) -> None:
        replaced: dict[int, nn.Parameter] = {}
        for sub in module.modules():
            base = prefix_of[id(sub)]
            for attr, p in list(sub._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                new = replaced.get(id(p))
                if new is None:
                    name = f"{base}.{attr}" if base else attr
                    if name not in hf_of:
                        continue  # not in the files: materialize_meta below
                    t = index.get(hf_of[name])
                    t = t.to(dtype=dtype or t.dtype, device=device)
                    new = replaced[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
                sub._parameters[attr] = new
            if hasattr(sub, "materialize_meta") and any(p.is_meta for p in sub.parameters(recurse=False)):
                sub.materialize_meta()
        left = [f"{prefix_of[id(sub)]}.{a}" for sub in module.modules() for a, p in sub._parameters.items()
                if p is not None and p.is_meta]
        if left:
            raise InvalidArgumentError(f"load_hf: parameters {left[:4]} are neither in the files nor created by "
                                       "their module's materialize_meta()")

    return fill


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None, shard: bool = False,
            group=None, strategy=None, mixed_precision=None,
            adapt: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Loads a Hugging Face Llama or Mistral directory (config.json, and model.safetensors or a sharded set with
    model.safetensors.index.json) into tessera's module for its family. The module's `config` attribute is the
    tessera config (LlamaConfig / MistralConfig, with the HF fields tessera does not use in `hf_extra`); its
    `generation_config` attribute is read_generation_config(path), which tessera.models.generate takes its EOS ids
    from.

    dtype: the parameters' dtype (None: as stored). device: where they live (None: CPU).
    shard=True: the model is built on the meta device and sharded with its family's parallelize (group, strategy,
    mixed_precision as tessera.shard), filling each unit from the files just before it is sharded: a rank holds at
    most one unsharded unit at a time, never the full model. Collective (every rank of `group` calls it).
    adapt(model): changes the model built on the meta device before it is filled and sharded, e.g.
    `lambda m: tessera.peft.apply_lora(m, cfg)` so adapters are sharded with their block; parameters it adds are
    created by their module's materialize_meta() (see fill_from), unit by unit.

    The model is built on the meta device and each parameter is read from the memory-mapped files once, so the
    weights are never held twice. Raises InvalidArgumentError (no such directory, no config.json or weights, an
    unknown model_type, missing/unexpected tensors or shapes that do not match config.json) and NotSupportedError
    (features tessera's decoder lacks: biases, another activation or RoPE scaling).
    """
    cfg = read_config(path)
    fam = family_of(cfg)
    index = WeightIndex(Path(path))
    model = build(cfg, device="meta")
    hf_of = _check_weights(fam, index, expected_params(model), cfg.tie_embeddings)
    if adapt is not None:
        adapt(model)
    prefix_of = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    fill = fill_from(index, hf_of, prefix_of, dtype=dtype, device=torch.device(device or "cpu"))
    if shard:
        fam.parallelize(model, group=group, strategy=strategy, mixed_precision=mixed_precision, before_shard=fill)
    else:
        fill(model)
    model.generation_config = read_generation_config(path, cfg.hf_extra)
    return model
