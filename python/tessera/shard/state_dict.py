"""Full (unsharded) state dicts of a sharded module, with the unsharded module's keys."""

from __future__ import annotations

import torch
import torch.nn as nn

from tessera.errors import InvalidArgumentError
from tessera.shard.runtime import UnitRuntime, unit_of


def units_in(module: nn.Module) -> list[UnitRuntime]:
    """The sharded units inside `module`; InvalidArgumentError if there is none."""
    units = []
    for mod in module.modules():
        unit = unit_of(mod)
        if unit is not None:
            units.append(unit)
    if not units:
        raise InvalidArgumentError(f"module {type(module).__name__} contains no tessera-sharded module")
    return units


def keys_by_location(module: nn.Module) -> dict[tuple[int, str], str]:
    """(id(owner module), attribute) -> the parameter's key in module.state_dict()."""
    return {
        (id(mod), attr): (f"{name}.{attr}" if name else attr)
        for name, mod in module.named_modules(remove_duplicate=False)
        for attr in mod._parameters
    }


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to its full shape (in the shard's dtype, on CPU) and every buffer, under the keys
    the unsharded module's state_dict() has. Collective: every rank of each unit's group must call it."""
    keys = keys_by_location(module)
    out = dict(module.state_dict())  # buffers and key order; sharded entries replaced below
    for unit in units_in(module):
        fulls = unit.unit.gather_full()
        for info, full in zip(unit.params, fulls):
            full = full.cpu()
            for mod, attr in info.locations:
                out[keys[(id(mod), attr)]] = full
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def load_full_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads an unsharded state dict (e.g. from full_state_dict or the unsharded model) into the shards.
    Every key must match; shapes must match the unsharded parameters."""
    from tessera.checkpoint import fences

    fences.wait_all()  # never overwrite shards a save is still staging
    keys = keys_by_location(module)
    expected = set(module.state_dict().keys())
    given = set(state_dict.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise InvalidArgumentError(
            f"load_full_state_dict: state dict does not match the module: missing keys {missing[:20]}, "
            f"unexpected keys {unexpected[:20]}"
        )
    handled = set()
    for unit in units_in(module):
        for i, info in enumerate(unit.params):
            loc_keys = [keys[(id(mod), attr)] for mod, attr in info.locations]
            value = state_dict[loc_keys[0]]
            if not isinstance(value, torch.Tensor):
                raise InvalidArgumentError(f"load_full_state_dict: '{loc_keys[0]}' is not a tensor")
            if tuple(value.shape) != tuple(info.full.shape):
                raise InvalidArgumentError(
                    f"load_full_state_dict: '{loc_keys[0]}' has shape {tuple(value.shape)} in the state dict but "
                    f"{tuple(info.full.shape)} in the module"
                )
            src = value.detach().to(device=unit.unit.flat_shard.device, dtype=unit.unit.flat_shard.dtype)
            unit.unit.load_full_param(i, src)
            handled.update(loc_keys)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in state_dict and name not in handled:
                value = state_dict[name]
                if tuple(value.shape) != tuple(buf.shape):
                    raise InvalidArgumentError(
                        f"load_full_state_dict: buffer '{name}' has shape {tuple(value.shape)} in the state dict "
                        f"but {tuple(buf.shape)} in the module"
                    )
                buf.copy_(value)
