"""Checks that turn silently wrong uses of a sharded model into errors.

- Optimizer steps (any torch.optim.Optimizer, tessera's AdamW included, through torch's global step pre-hook):
  * an optimizer built before tessera.shard holds the original parameters, which shard() replaced with shards:
    it would train nothing;
  * a unit still holds gradients kept locally with gradient sync off (no backward with sync on since): the step
    would not see them. See [Note: local gradients belong to .grad] in csrc/tessera/torch/unit.h.
- Conversions after sharding (`module.to(dtype)`, `.to(device)`, `.half()`, `.float()`, `.cuda()`...): they
  would change the shard views and the module's attributes but not the unit's flat shard, its gradient buffers or
  the unsharded parameters the forward computes with. They raise instead, unless they change nothing.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tessera.errors import StateError
from tessera.shard.runtime import REPLACED_NAME_ATTR, managed_by, unit_of

# On each module whose conversions are guarded: the guard's bookkeeping (see guard_conversions).
_GUARDED_ATTR = "_tessera_conversion_guard"
# On each optimizer: (a signature of its parameter list, the units its parameters belong to).
_OPT_CACHE_ATTR = "_tessera_step_guard"


def check_local_grads(units, what: str) -> None:
    """Raises StateError if a unit in `units` (UnitRuntime objects) holds gradients kept locally with gradient
    sync off that no reduction has taken yet: `what` (an optimizer step, clipping) would miss them."""
    for unit in units:
        names = unit.unit.pending_local_grads()
        if names:
            shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise StateError(
                f"{what} while unit '{unit.name}' holds gradients of {shown} that were accumulated locally with "
                "gradient sync off (tessera.set_requires_gradient_sync(model, False)) and never reduced, so it would "
                "not see them. Turn sync back on before the backward of the last micro-batch of the accumulation "
                "window, or call zero_grad() to drop the window"
            )


def _units_of_optimizer(opt: torch.optim.Optimizer) -> list:
    """The units whose shards `opt` steps on; raises StateError if it holds parameters that tessera.shard
    replaced. Cached per optimizer until its parameter list changes (add_param_group)."""
    signature = tuple(len(g["params"]) for g in opt.param_groups)
    cached = opt.__dict__.get(_OPT_CACHE_ATTR)
    if cached is not None and cached[0] == signature:
        return [u for u in (r() for r in cached[1]) if u is not None]
    units: dict[int, object] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            unit = managed_by(p)
            if unit is None:
                continue
            if unit.param_index(p) < 0:
                name = getattr(p, REPLACED_NAME_ATTR, None) or "?"
                raise StateError(
                    f"{type(opt).__name__} holds parameter '{name}' of unit '{unit.name}' as it was before "
                    "tessera.shard replaced it with this rank's shard: the optimizer would train nothing. Build the "
                    "optimizer after tessera.shard, from model.parameters() (which then yields the shards)"
                )
            units[id(unit)] = unit
    opt.__dict__[_OPT_CACHE_ATTR] = (signature, [weakref.ref(u) for u in units.values()])
    return list(units.values())


def _step_pre_hook(opt, args, kwargs):
    units = _units_of_optimizer(opt)
    if units:
        check_local_grads(units, f"{type(opt).__name__}.step()")
    return None


_hook_handle = register_optimizer_step_pre_hook(_step_pre_hook)


# ---- conversions after sharding -------------------------------------------------------------------------------


def _units_touched(module: nn.Module) -> list:
    """Every unit that owns `module`'s subtree or a parameter in it."""
    units: dict[int, object] = {}
    for mod in module.modules():
        unit = unit_of(mod)
        if unit is not None:
            units[id(unit)] = unit
        for p in mod._parameters.values():
            unit = managed_by(p) if p is not None else None
            if unit is not None:
                units[id(unit)] = unit
    return list(units.values())


def _check_conversion(module: nn.Module, fn) -> None:
    for unit in _units_touched(module):
        shard = unit.flat_shard
        out = fn(torch.empty(0, dtype=shard.dtype, device=shard.device))
        if not isinstance(out, torch.Tensor):
            continue
        if out.dtype != shard.dtype:
            raise StateError(
                f"converting {type(module).__name__} to {out.dtype} after tessera.shard: unit '{unit.name}' keeps "
                f"its parameters as {shard.dtype} shards, and the conversion would reach only part of them. To "
                f"compute in {out.dtype}, pass mixed_precision=tessera.MixedPrecision(param_dtype={out.dtype}) to "
                f"tessera.shard; to store {out.dtype} parameters, convert the model before tessera.shard"
            )
        if out.device != shard.device:
            raise StateError(
                f"moving {type(module).__name__} to {out.device} after tessera.shard: unit '{unit.name}' keeps its "
                f"shards, gradients and communicator on {shard.device}. Move the model to its device before "
                "tessera.shard"
            )


_guarded_classes: dict[type, type] = {}


def _guarded_class(cls: type) -> type:
    """A subclass of `cls` (same name, so messages and reprs do not change) whose _apply checks first."""
    guarded = _guarded_classes.get(cls)
    if guarded is None:

        def _apply(self, fn, recurse=True):
            _check_conversion(self, fn)
            return cls._apply(self, fn, recurse)

        guarded = type(cls)(cls.__name__, (cls,), {"_apply": _apply, "__module__": cls.__module__,
                                              "__qualname__": cls.__qualname__, _GUARDED_ATTR: True})
        _guarded_classes[cls] = guarded
    return guarded


def guard_conversions(module: nn.Module) -> None:
    """Makes `module._apply` (behind .to(), .half(), .float(), .cuda(), ...) raise StateError, before changing
    anything, when the conversion would change the dtype or device of a sharded parameter in its subtree.
    Conversions that change nothing (`.float()` on fp32 shards, `.to()` its own device) still run. As FSDP2's
    fully_shard does, the module's class is swapped for a subclass (same name) that overrides the method; a
    conversion called on a submodule that was not passed to tessera.shard is not guarded."""
    if not getattr(type(module), _GUARDED_ATTR, False):
        module.__class__ = _guarded_class(type(module))
