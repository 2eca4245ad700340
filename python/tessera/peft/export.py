"""save_adapter: a tessera LoRA model's adapters -> a peft adapter directory (adapter_model.safetensors +
adapter_config.json) that peft.PeftModel.from_pretrained loads onto the transformers model.

Merged export: tessera.models.save_hf(model, dir, merge_adapters=True) (plain or sharded), or merge_lora(model)
then save_hf(model, dir) (plain).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from tessera.errors import InvalidArgumentError
from tessera.models.registry import family_of
from tessera.peft.lora import TARGET_HF, LoRAConfig, lora_modules
from tessera.shard.runtime import unit_of
from tessera.shard.state_dict import iter_full_params

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_key(hf_adapter, module_path: str, which: str) -> str:
    """peft's saved key for adapter `which` ('lora_A' or 'lora_B') of tessera module layers.N.attention.wq:
    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight (PeftModel wraps the CausalLM as
    base_model.model; the adapter name 'default' is not part of saved keys)."""
    hf_weight = hf_adapter.to_hf(f"{module_path}.weight")  # model.layers.N.self_attn.q_proj.weight
    return f"base_model.model.{hf_weight[: -len('.weight')]}.{which}.weight"


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """tessera parameter name (layers.N.attention.wq.lora_A) -> full tensor on CPU, for every adapter.
    Sharded units are all-gathered one at a time (collective; peak memory about one unit), keeping the adapters
    only."""
    wanted = {f"{path}.{w}" for path in lora_modules(model) for w in ("lora_A", "lora_B")}
    out: dict[str, torch.Tensor] = {}
    # A unit's whole flat buffer is gathered, frozen base included: _C.Unit has no gather of the trainable prefix
    # alone. One unit at a time keeps the cost to one block's weights.
    for name, full in iter_full_params(model):
        if name in wanted:
            out[name] = full.detach().cpu().clone()
    missing = wanted - set(out)
    if missing:
        raise InvalidArgumentError(f"save_adapter: adapters {sorted(missing)[:4]} were not found among the "
                                   "model's parameters")
    return out


def adapter_config(cfg: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    """The adapter_config.json dict peft's LoraConfig reads for `cfg` (a path-like base is written as a string)."""
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(TARGET_HF[t] for t in cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Writes `model`'s LoRA adapters (a tessera Llama/Mistral after apply_lora, plain or sharded) as a peft
    adapter directory: adapter_model.safetensors (keys base_model.model.model.layers.N.self_attn.q_proj.lora_A
    .weight [r, in] and ...lora_B.weight [out, r]) and adapter_config.json (peft_type LORA, r, lora_alpha,
    lora_dropout, target_modules in HF names, task_type CAUSAL_LM, bias none). dtype: stored dtype (None: the
    adapters'). base_model_name_or_path: recorded for peft (the HF directory or hub id of the base model).

    Sharded: collective (every rank calls it); rank 0 writes, each file under a temporary name then renamed,
    and the other ranks return once the files are in place. Returns out_dir as a Path. Raises
    InvalidArgumentError for a model without adapters or without a tessera model config."""
    cfg = getattr(model, "lora_config", None)
    if not isinstance(cfg, LoRAConfig) or not lora_modules(model):
        raise InvalidArgumentError(f"save_adapter: {type(model).__name__} has no LoRA adapters (apply "
                                   "tessera.peft.apply_lora first)")
    model_cfg = getattr(model, "config", None)
    fam = family_of(model_cfg) if model_cfg is not None else None
    if fam is None:
        raise InvalidArgumentError(f"save_adapter expects a tessera model with a model config, got "
                                   f"{type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidArgumentError(f"save_adapter: dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    # Made on every rank before the collective gather and before any file is written: a bad argument raises on
    # every rank and leaves no new weights next to an old (or no) config.
    config_text = json.dumps(adapter_config(cfg, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    sharded = any(unit_of(m) is not None for m in model.modules())
    rank = dist.get_rank() if sharded and dist.is_initialized() else 0
    tensors = _adapter_tensors(model)  # collective when sharded
    out = Path(out_dir)
    if rank == 0:
        weights = {}
        for name, t in tensors.items():
            path, _, which = name.rpartition(".")
            weights[peft_key(fam.adapter, path, which)] = t.to(dtype or t.dtype).contiguous()
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{ADAPTER_WEIGHTS}.tmp-{os.getpid()}"
        tmp_config = out / f".{ADAPTER_CONFIG}.tmp-{os.getpid()}"
        try:
            save_file(weights, str(tmp), metadata={"format": "pt"})
            tmp_config.write_text(config_text)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: no temporary files left behind
            tmp_config.unlink(missing_ok=True)
            raise
        os.replace(tmp, out / ADAPTER_WEIGHTS)
        os.replace(tmp_config, out / ADAPTER_CONFIG)
    if sharded and dist.is_initialized():
        dist.barrier()  # the other ranks return once rank 0's files are in place
    return out
