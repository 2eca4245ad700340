"""Full (unsharded) state dicts of a sharded module, with the unsharded module's keys.

Two ways in, with the same result:
  - `tessera.full_state_dict(module)` / `tessera.load_full_state_dict(module, sd)`;
  - the module's own `state_dict()` / `load_state_dict()`, through hooks that `tessera.shard()` installs here
    (`install_state_dict_hooks`).

[Note: state_dict() of a sharded module] After sharding, a module holds 1-D local shards, so torch's
`state_dict()` alone would return unlabelled shards under the unsharded keys: a file `torch.save` writes from it is
useless, and `load_state_dict(full)` fails on sizes. We follow FSDP1's default (FULL_STATE_DICT): `state_dict()`
returns every parameter gathered to its original shape, in the shard's dtype (the fp32 master under mixed
precision), detached, on CPU, on every rank; buffers are torch's as usual; tied weights appear under both keys as
one tensor, like torch. It is therefore a collective: every rank of each unit's group must call it, in the same
order. Each rank holds the whole model in CPU memory for a moment; for large models save with
`tessera.checkpoint.Checkpointer` (sharded, asynchronous) instead. `load_state_dict(full)` copies each rank's part
of the full tensors into its shards (no communication), after waiting for checkpoint staging in flight; strict and
non-strict behave as torch's; `assign=True` is accepted but values are copied into the shards, which keep their
identity (an optimizer holds them).

How: a post-hook on every module that holds a sharded parameter replaces the shard in the destination with the
full tensor (so submodules' state_dict() and prefixes work as torch's); each unit is gathered once per
`state_dict()` call (cached for that call's destination dict) and at the first module that needs it, so every rank
issues the gathers in the same order: the module tree's. Code that only needs the keys or the buffers (tessera's
own) calls state_dict() inside `local_shards()`, which turns the hooks off: no communication.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn as nn

from tessera.errors import InvalidArgumentError
from tessera.shard import fences
from tessera.shard.runtime import UnitRuntime, managed_by, unit_of

_HOOKED_ATTR = "_tessera_state_dict_hooks"


class _Local(threading.local):
    def __init__(self):
        self.off = 0  # depth of local_shards() contexts on this thread
        self.dest_ref: weakref.ref | None = None  # the destination dict of the state_dict() call being served
        self.fulls: dict[int, tuple[UnitRuntime, list[torch.Tensor]]] = {}  # id(unit) -> its gathered params


_local = _Local()


@contextlib.contextmanager
def local_shards():
    """Inside it, state_dict() / load_state_dict() of sharded modules are torch's plain ones on the local 1-D
    shards (no gathering, no communication): for code that needs only the keys or the buffers."""
    _local.off += 1
    try:
        yield
    finally:
        _local.off -= 1


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


def iter_full_params(module: nn.Module):
    """(key in module.state_dict(), full tensor) for every parameter, one unit at a time: each sharded unit is
    all-gathered (collective: every rank of each unit's group iterates to the end) and yielded under each of its
    parameters' keys (tied ones under every key); parameters outside any unit come as they are. Peak memory: one
    unit's full parameters."""
    keys = keys_by_location(module)
    for sub in module.modules():
        unit = unit_of(sub)
        if unit is None:
            continue
        for info, full in zip(unit.params, unit.gather_full()):
            for mod, attr in info.locations:
                yield keys[(id(mod), attr)], full
    for name, p in module.named_parameters():
        if managed_by(p) is None:
            yield name, p


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to its full shape (in the shard's dtype, on CPU) and every buffer, under the keys
    the unsharded module's state_dict() has. Collective: every rank of each unit's group must call it."""
    keys = keys_by_location(module)
    with local_shards():
        out = dict(module.state_dict())  # buffers and key order; sharded entries replaced below
    for unit in units_in(module):
        fulls = unit.gather_full()
        for info, full in zip(unit.params, fulls):
            full = full.cpu()
            for mod, attr in info.locations:
                out[keys[(id(mod), attr)]] = full
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def load_full_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads an unsharded state dict (e.g. from full_state_dict or the unsharded model) into the shards.
    Every key must match; shapes must match the unsharded parameters."""
    fences.wait_all()  # never overwrite shards a save is still staging
    keys = keys_by_location(module)
    with local_shards():
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
            _check_full_shape("load_full_state_dict", loc_keys[0], value, info.full.shape)
            src = value.detach().to(device=unit.flat_shard.device, dtype=unit.flat_shard.dtype)
            unit.load_full_param(i, src)
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


def _check_full_shape(what: str, key: str, value: torch.Tensor, full_shape) -> None:
    """InvalidArgumentError unless `value` has the unsharded parameter's shape."""
    if tuple(value.shape) == tuple(full_shape):
        return
    hint = ""
    if value.dim() == 1 and value.numel() <= torch.Size(full_shape).numel():
        hint = ("; a 1-D tensor like this is what a rank's local shard looks like: pass full tensors, as "
                "model.state_dict(), tessera.full_state_dict(model) or the unsharded model give them (or use "
                "tessera.load_full_state_dict)")
    raise InvalidArgumentError(
        f"{what}: '{key}' has shape {tuple(value.shape)} in the state dict but {tuple(full_shape)} in the module "
        f"(the full, unsharded shape){hint}"
    )


# ---- module hooks (see [Note: state_dict() of a sharded module]) ----------------------------------------------


def install_state_dict_hooks(runtime: UnitRuntime) -> None:
    """Makes state_dict() / load_state_dict() of `runtime.module` and of every module holding one of its
    parameters work with full tensors. Called once by tessera.shard(), after runtime.install()."""
    modules = {id(runtime.module): runtime.module}
    for info in runtime.params:
        for mod, _ in info.locations:
            modules.setdefault(id(mod), mod)
    for mod in modules.values():
        if mod.__dict__.get(_HOOKED_ATTR):
            continue  # its hooks handle parameters of any unit
        mod.register_state_dict_pre_hook(_state_dict_pre_hook)
        mod.register_state_dict_post_hook(_state_dict_post_hook)
        mod.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
        mod.__dict__[_HOOKED_ATTR] = True


def _sharded_index(p) -> tuple[UnitRuntime, int] | None:
    """(unit, layout index) if `p` is a unit's local shard, else None (a plain parameter, or the unsharded
    parameter swapped in during forward, which torch's state_dict() already shows in full)."""
    unit = managed_by(p) if p is not None else None
    if unit is None:
        return None
    i = unit.param_index(p)
    return (unit, i) if i >= 0 else None


def _fulls_for(unit: UnitRuntime, dest) -> list[torch.Tensor]:
    """The unit's parameters gathered to CPU, once per state_dict() call (identified by its destination dict)."""
    if _local.dest_ref is None or _local.dest_ref() is not dest:
        _local.fulls = {}
        try:
            _local.dest_ref = weakref.ref(dest, _forget)
        except TypeError:  # a plain dict passed as destination=: no caching, each module gathers again
            _local.dest_ref = None
    entry = _local.fulls.get(id(unit))
    if entry is None:
        entry = (unit, [t.detach().cpu() for t in unit.gather_full()])
        _local.fulls[id(unit)] = entry
    return entry[1]


def _forget(ref) -> None:
    if _local.dest_ref is ref:  # the destination dict is gone: so is the cache that served it
        _local.dest_ref, _local.fulls = None, {}


def _state_dict_pre_hook(module, prefix, keep_vars) -> None:
    unit = unit_of(module)
    if unit is not None and not _local.off:
        _local.fulls.pop(id(unit), None)  # a new pass over the unit: never reuse an earlier call's gather


def _state_dict_post_hook(module, state_dict, prefix, local_metadata) -> None:
    if _local.off:
        return
    for attr, p in module._parameters.items():
        found = _sharded_index(p)
        key = prefix + attr
        if found is not None and key in state_dict:
            unit, i = found
            state_dict[key] = _fulls_for(unit, state_dict)[i]
    unit = unit_of(module)
    if unit is not None:  # every location of the unit lies below its module: the gather is no longer needed
        _local.fulls.pop(id(unit), None)


def _load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
    if _local.off:
        return
    # Check every sharded parameter below this module before writing any, so a wrong shape leaves the shards as
    # they were (the first hooked module of a load_state_dict() call sees all of its keys).
    for name, mod in module.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            found = _sharded_index(p)
            key = prefix + (f"{name}.{attr}" if name else attr)
            if found is not None and isinstance(state_dict.get(key), torch.Tensor):
                unit, i = found
                _check_full_shape("load_state_dict", key, state_dict[key], unit.params[i].full.shape)
    waited = False
    for attr, p in module._parameters.items():
        found = _sharded_index(p)
        key = prefix + attr
        if found is None or not isinstance(state_dict.get(key), torch.Tensor):
            continue  # missing keys and non-tensors: torch reports them
        if not waited:
            fences.wait_all()  # never overwrite shards a save is still staging
            waited = True
        unit, i = found
        flat = unit.flat_shard
        unit.load_full_param(i, state_dict[key].detach().to(device=flat.device, dtype=flat.dtype))
        # torch's own copy then copies the shard onto itself (a no-op), and counts the key as loaded.
        state_dict[key] = p
