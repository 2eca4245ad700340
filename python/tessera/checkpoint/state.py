"""Maps a user's state (modules, optimizers, stateful objects, plain dicts) to checkpoint pieces and extras, and
back. Parameters and optimizer state are saved as each rank's range of the flattened full tensor (the unit's
plan), so they load on any number of ranks and under any strategy; everything else is JSON (no pickle)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from tessera.errors import CheckpointError, InvalidArgumentError
from tessera.shard.runtime import UnitRuntime, managed_by, unit_of
from tessera.shard.state_dict import keys_by_location


class RNGState:
    """Put one in the saved state to save and restore every rank's random number generators (torch CPU and CUDA,
    Python's random, NumPy's global RandomState). Per rank: rank r restores what rank r saved."""

    per_rank = True

    def state_dict(self) -> dict:
        out = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = torch.cuda.get_rng_state_all()
        return out

    def load_state_dict(self, sd: dict) -> None:
        torch.set_rng_state(sd["torch"])
        random.setstate(sd["python"])
        np.random.set_state(sd["numpy"])
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["cuda"])


@dataclass
class Slot:
    """One logical tensor: the range this rank saves, and the range it loads and where the values go."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    save: torch.Tensor | None  # 1-D view of the elements this rank saves (None: another rank saves them)
    save_start: int
    load_start: int
    load_count: int
    apply: Callable[[torch.Tensor], None]  # receives the loaded 1-D CPU tensor
    unit: UnitRuntime | None = None


@dataclass
class ParamPlace:
    name: str
    unit: UnitRuntime | None
    save_start: int
    save_count: int
    load_start: int
    load_count: int
    full_shape: tuple[int, ...]
    # local view offset of the save range inside the rank's local tensor (replicated units save a chunk of it)
    save_offset: int = 0


def _copy_into(dst: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def apply(src: torch.Tensor) -> None:
        with torch.no_grad():
            dst.copy_(src.reshape(dst.shape).to(dst.device, dst.dtype))

    return apply


@dataclass
class Collected:
    slots: list[Slot] = field(default_factory=list)
    places: dict[int, ParamPlace] = field(default_factory=dict)  # id(parameter) -> where it lives
    # Persistent module buffers that are not floating-point, by checkpoint name: JSON, not pieces (see
    # [Note: tensors in extras] in extras.py).
    nonfloat_buffers: dict[str, torch.Tensor] = field(default_factory=dict)


def collect_module(key: str, module: nn.Module, rank: int, world: int, out: Collected) -> None:
    keys = keys_by_location(module)
    seen: set[int] = set()
    for mod in module.modules():
        unit = unit_of(mod)
        if unit is None:
            continue
        for i, info in enumerate(unit.params):
            fqn = keys[(id(info.locations[0][0]), info.locations[0][1])]
            shape = tuple(info.full.shape)
            numel = info.full.numel()
            local = info.sharded
            start, n = unit.save_range(i)  # from the unit's ShardPlan
            if unit.sharded:  # this rank owns [start, start + n): it saves and loads exactly that
                place = ParamPlace(f"{key}/{fqn}", unit, start, n, start, n, shape)
            else:  # replicated: every rank loads all; the ranks split the writing
                place = ParamPlace(f"{key}/{fqn}", unit, start, n, 0, numel, shape, save_offset=start)
            out.places[id(local)] = place
            seen.add(id(local))
            out.slots.append(_slot_for(place, place.name, local))
    # Parameters no unit manages (an unsharded module) and persistent buffers: rank 0 saves, every rank loads.
    state_keys = {f"{prefix}.{b}" if prefix else b for prefix, m in module.named_modules()  # persistent buffers,
                  for b in m._buffers if b not in m._non_persistent_buffers_set}  # no gathering state_dict()
    for name, p in module.named_parameters():
        if id(p) in seen or managed_by(p) is not None:
            continue
        place = ParamPlace(f"{key}/{name}", None, 0, p.numel() if rank == 0 else 0, 0, p.numel(), tuple(p.shape))
        out.places[id(p)] = place
        out.slots.append(_slot_for(place, place.name, p))
    for name, b in module.named_buffers():
        if name not in state_keys:
            continue
        if not b.is_floating_point():
            out.nonfloat_buffers[f"{key}/{name}"] = b
            continue
        place = ParamPlace(f"{key}/{name}", None, 0, b.numel() if rank == 0 else 0, 0, b.numel(), tuple(b.shape))
        out.slots.append(_slot_for(place, place.name, b))


def _slot_for(place: ParamPlace, name: str, local: torch.Tensor) -> Slot:
    flat = local.detach().reshape(-1)
    # A tensor without elements has no piece anywhere; an empty one declares it (name, dtype, shape), so that it
    # is in the checkpoint and loads (else every load fails with "missing from checkpoint").
    empty = torch.Size(place.full_shape).numel() == 0
    save = (flat[place.save_offset : place.save_offset + place.save_count] if place.save_count or empty
            else None)
    return Slot(name=name, shape=place.full_shape, dtype=local.dtype, save=save, save_start=place.save_start,
                load_start=place.load_start, load_count=place.load_count, apply=_copy_into(flat), unit=place.unit)


def collect_optimizer(key: str, opt: torch.optim.Optimizer, places: dict[int, ParamPlace], out: Collected,
                      load: bool, saved_names: set[str] | None = None) -> dict:
    """Slots for the optimizer's per-parameter tensors (aligned with the parameter's shard) and its JSON part:
    hyperparameters per group and non-tensor / scalar state. On load, state entries are created as needed."""
    from tessera.optim import AdamW

    groups, scalars = [], {}
    for gi, group in enumerate(opt.param_groups):
        names = []
        for p in group["params"]:
            place = places.get(id(p))
            if place is None:
                raise InvalidArgumentError(
                    f"checkpoint: optimizer '{key}' holds a parameter that no module in the saved state owns; put "
                    "the model in the same state dict as its optimizer")
            pname = place.name.split("/", 1)[1]
            names.append(pname)
            if load:
                prefix = f"{key}/{pname}/"
                wanted = sorted(n[len(prefix):] for n in (saved_names or ()) if n.startswith(prefix))
                if not wanted:
                    continue
                if isinstance(opt, AdamW):
                    state = opt._init_state(p)
                else:
                    state = opt.state[p]
                    for k in wanted:
                        state.setdefault(k, torch.zeros_like(p))
                items = [(k, state[k]) for k in wanted]
            else:
                items = [(k, v) for k, v in opt.state.get(p, {}).items() if _is_shard_state(v, p)]
            for k, v in items:
                out.slots.append(_slot_for(place, f"{key}/{pname}/{k}", v))
            if not load:
                sc = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in opt.state.get(p, {}).items()
                      if not _is_shard_state(v, p)}
                if sc:
                    scalars[pname] = sc
        groups.append({"hyper": {k: v for k, v in group.items() if k != "params"}, "params": names})
    return {"groups": groups, "scalars": scalars}


def _is_shard_state(v, p: torch.Tensor) -> bool:
    """Per-element optimizer state (exp_avg, ...) is shaped like the parameter's shard; the rest (step) is not."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return False
    if v.shape != p.shape:
        raise InvalidArgumentError(f"checkpoint: optimizer state of shape {tuple(v.shape)} for a parameter shard of "
                                   f"shape {tuple(p.shape)} is not supported")
    return True


def restore_optimizer_json(key: str, opt: torch.optim.Optimizer, data: dict, places: dict[int, ParamPlace]) -> None:
    groups = data["groups"]
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"checkpoint: optimizer '{key}' has {len(opt.param_groups)} parameter groups but the "
                              f"checkpoint has {len(groups)}")
    by_name = {}
    for group, saved in zip(opt.param_groups, groups):
        for k, v in saved["hyper"].items():
            group[k] = tuple(v) if isinstance(v, list) and k == "betas" else v
        for p in group["params"]:
            by_name[places[id(p)].name.split("/", 1)[1]] = p
    for pname, sc in data["scalars"].items():
        p = by_name.get(pname)
        if p is None:
            continue
        state = opt.state[p]
        for k, v in sc.items():
            state[k] = torch.tensor(float(v)) if k == "step" else v
