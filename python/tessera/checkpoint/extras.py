"""Tensors that live outside module parameters and optimizer state: the checkpoint's JSON extras and their pieces.

[Note: tensors in extras]
Plain dicts and state_dict() objects are saved as JSON (no pickle). A floating-point tensor inside one (an EMA copy
of the weights, a running statistic) goes to the data files instead: written by the engine and checksummed, not
base64 text in the manifest (a 252 MB tensor in a dict took 30 s to save as JSON on the dev VM). Like every plain
value it is captured when save() is called (Checkpointer.save clones every piece that is not a unit's shard; the
caller may change it right away), and rank 0 saves it:
extras are global, the same on every rank. The JSON keeps a placeholder {"__piece__": name}; loading reads the piece
and puts a CPU tensor in its place. Other tensors (integer, bool) stay in the JSON: the engine's dtypes are the
floating ones.

Module buffers that are not floating-point (BatchNorm's num_batches_tracked, integer position ids) go the other
way: they cannot be pieces, so rank 0's values are JSON entries under the reserved extras key "/buffers" (state
keys never contain "/"), checked against the model and restored on load like every other module tensor.
"""

from __future__ import annotations

import torch

from tessera.checkpoint.state import Collected, Slot
from tessera.errors import CheckpointError, InvalidArgumentError

PIECE = "__piece__"
BUFFERS_KEY = "/buffers"


def _ignore(_tensor: torch.Tensor) -> None:
    pass


def tensors_to_pieces(key: str, obj, rank: int, out: Collected):
    """`obj` with every floating-point tensor replaced by a placeholder; adds a slot per tensor (saved by rank 0;
    Checkpointer.save clones it before returning)."""
    seen: set[str] = set()

    def walk(o, path: str):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            name = f"{key}/{path}"
            if name in seen:
                raise InvalidArgumentError(f"checkpoint: two tensors in state['{key}'] map to the name '{name}'")
            seen.add(name)
            save = o.detach().reshape(-1) if rank == 0 else None
            out.slots.append(Slot(name=name, shape=tuple(o.shape), dtype=o.dtype, save=save, save_start=0,
                                  load_start=0, load_count=0, apply=_ignore))
            return {PIECE: name}
        if isinstance(o, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            items = [walk(v, f"{path}[{i}]") for i, v in enumerate(o)]
            return tuple(items) if isinstance(o, tuple) else items
        return o

    return walk(obj, "")


def pieces_to_tensors(obj, reader, saved: dict):
    """`obj` (decoded JSON extras) with each placeholder replaced by its piece, read and verified (CPU tensors)."""
    if isinstance(obj, dict):
        if set(obj) == {PIECE}:
            name = obj[PIECE]
            if name not in saved:
                raise CheckpointError(f"checkpoint extras refer to tensor '{name}', which is not in the checkpoint")
            dtype_name, shape = saved[name]
            shape = tuple(shape)
            buf = torch.empty(int(torch.Size(shape).numel()), dtype=getattr(torch, dtype_name))
            if buf.numel():
                reader.read(name, 0, buf)
            return buf.reshape(shape)
        return {k: pieces_to_tensors(v, reader, saved) for k, v in obj.items()}
    if isinstance(obj, list):
        return [pieces_to_tensors(v, reader, saved) for v in obj]
    if isinstance(obj, tuple):
        return tuple(pieces_to_tensors(v, reader, saved) for v in obj)
    return obj


def save_buffers(buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: b.detach().cpu().clone() for name, b in buffers.items()}


def check_buffers(expected: dict[str, torch.Tensor], saved: dict) -> tuple[list[str], list[str]]:
    """(missing, mismatched) descriptions, in the form the checkpointer's mismatch error uses."""
    missing = sorted(n for n in expected if n not in saved)
    mismatched = sorted(
        f"{n}: checkpoint {tuple(saved[n].shape)} {str(saved[n].dtype).removeprefix('torch.')}, model "
        f"{tuple(b.shape)} {str(b.dtype).removeprefix('torch.')}"
        for n, b in expected.items() if n in saved and (saved[n].shape != b.shape or saved[n].dtype != b.dtype))
    return missing, mismatched


def restore_buffers(expected: dict[str, torch.Tensor], saved: dict) -> None:
    with torch.no_grad():
        for name, b in expected.items():
            b.copy_(saved[name].to(b.device))
