"""Consolidated model export/import in safetensors, for inference and Hugging Face tools."""

from __future__ import annotations

import os

import torch.distributed as dist
import torch.nn as nn

from tessera.errors import CheckpointError
from tessera.shard.state_dict import full_state_dict, load_full_state_dict


def export_safetensors(module: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Gathers the full model (collective: every rank calls it) and rank 0 writes it to `path` atomically.
    Tied parameters are written once per key (safetensors stores no aliases)."""
    from safetensors.torch import save_file

    sd = full_state_dict(module)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        seen, out = set(), {}
        for k, v in sd.items():
            out[k] = v.clone() if v.data_ptr() in seen else v.contiguous()
            seen.add(v.data_ptr())
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(out, tmp, metadata=metadata or {"format": "pt", "producer": "tessera"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def import_safetensors(module: nn.Module, path: str | os.PathLike) -> None:
    """Loads a consolidated safetensors file (e.g. exported by export_safetensors or a Hugging Face model's
    weights with matching names) into a sharded module; every rank reads the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(os.fspath(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read safetensors file {os.fspath(path)}: {e}") from None
    load_full_state_dict(module, sd)
