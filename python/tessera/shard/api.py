"""tessera.shard(): the public entry point that turns a module into a sharded unit (DESIGN.md section 4)."""

from __future__ import annotations

import torch.nn as nn

from tessera import knobs
from tessera.errors import InvalidArgumentError, NotSupportedError, StateError
from tessera.shard import comm as _comm
from tessera.shard.runtime import ParamInfo, UnitRuntime, managed_by, unit_of
from tessera.shard.guards import guard_conversions
from tessera.shard.state_dict import install_state_dict_hooks
from tessera.shard.types import MixedPrecision, ShardingStrategy

__all__ = ["MixedPrecision", "ShardingStrategy", "set_requires_gradient_sync", "shard"]


def shard(
    module: nn.Module,
    *,
    group=None,
    strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD,
    mixed_precision: MixedPrecision | None = None,
    reshard_after_forward: bool | None = None,
) -> nn.Module:
    """Shards `module`'s parameters (those not already managed by a sharded submodule) across `group`.

    Apply bottom-up: each block first, then the root. Afterwards `module.parameters()` yields this rank's local
    shards (1-D tensors) and `module(x)` computes what the unsharded module computed. Activation checkpointing
    (torch.utils.checkpoint, reentrant or not) may wrap the module before sharding or sit inside it.

    Between steps, `requires_grad_()` on the module's parameters takes effect at the next forward (a parameter
    that gets no gradient in a step keeps `grad=None`, as in one process). A parameter frozen when shard() is
    called has no gradient buffer: unfreezing it later raises tessera.StateError at the next forward, naming it.

    Raises InvalidArgumentError (bad module, option, dtype or device), StateError (already sharded),
    NotSupportedError (HYBRID_SHARD).
    """
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(f"tessera.shard expects an nn.Module, got {type(module).__name__}")
    if unit_of(module) is not None:
        raise StateError(f"module {type(module).__name__} is already sharded by tessera; shard each module once")
    if not isinstance(strategy, ShardingStrategy):
        raise InvalidArgumentError(
            f"strategy={strategy!r} is not a tessera.ShardingStrategy; expected one of "
            f"{[s.name for s in ShardingStrategy]}"
        )
    if strategy is ShardingStrategy.HYBRID_SHARD:
        raise NotSupportedError(
            "ShardingStrategy.HYBRID_SHARD is not yet supported; use FULL_SHARD, SHARD_GRAD_OP or NO_SHARD"
        )
    if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecision):
        raise InvalidArgumentError(
            f"mixed_precision must be a tessera.MixedPrecision or None, got {type(mixed_precision).__name__}"
        )
    if reshard_after_forward is not None and strategy is not ShardingStrategy.FULL_SHARD:
        raise InvalidArgumentError(
            f"reshard_after_forward applies to FULL_SHARD only; {strategy.name} decides it by itself"
        )
    group = _comm.resolve_group(group)
    params = _collect_params(module)
    if not params:
        raise InvalidArgumentError(
            f"module {type(module).__name__} has no parameters left to shard (all are managed by sharded "
            "submodules or it has none)"
        )
    device = params[0].tensor.device
    for info in params:
        if not info.tensor.is_floating_point():
            raise InvalidArgumentError(
                f"parameter '{info.name}' has dtype {info.tensor.dtype}; tessera shards floating-point parameters "
                "only (keep integer state in buffers)"
            )
        if info.tensor.device != device:
            raise InvalidArgumentError(
                f"parameter '{info.name}' is on {info.tensor.device} but '{params[0].name}' is on {device}; "
                "move the module to one device before sharding"
            )
    communicator = _comm.communicator(group, device)
    mp = mixed_precision or MixedPrecision()
    runtime = UnitRuntime(
        module=module,
        params=params,
        comm=communicator,
        strategy=strategy,
        param_dtype=mp.param_dtype,
        reduce_dtype=mp.reduce_dtype or mp.param_dtype,
        reshard_after_forward=reshard_after_forward,
        timeout_s=knobs.load().collective_timeout_s,
    )
    runtime.install()
    install_state_dict_hooks(runtime)  # state_dict() / load_state_dict() with full tensors
    guard_conversions(module)  # .to(dtype/device) after sharding raises instead of half-applying
    return module


def _collect_params(module: nn.Module) -> list[ParamInfo]:
    """The module's parameters not owned by a sharded submodule, deduplicated (tied weights become one entry
    with several locations), trainable first then frozen, each group in registration order."""
    # Which unit, if any, each submodule lives under (a sharded submodule owns everything below it).
    inside: dict[int, UnitRuntime] = {}
    for _, sub in module.named_modules():
        unit = unit_of(sub)
        if unit is not None and sub is not module:
            for m in sub.modules():
                inside.setdefault(id(m), unit)
    by_id: dict[int, ParamInfo] = {}
    order: list[ParamInfo] = []
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, p in list(mod._parameters.items()):
            if p is None:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            owner = managed_by(p)
            if owner is not None:
                if inside.get(id(mod)) is not owner and any(m is module for m in owner.module.modules()):
                    raise StateError(
                        f"parameter '{name}' is already managed by the sharded unit '{owner.name}', which encloses "
                        f"this {type(module).__name__}: it was sharded first. tessera.shard applies bottom-up: "
                        "shard each block first, then the root (the root takes what no sharded block owns)"
                    )
                if inside.get(id(mod)) is not owner:
                    raise InvalidArgumentError(
                        f"parameter '{name}' is shared with the sharded unit '{owner.name}', which does not contain "
                        "this location: tied parameters must live in one unit, so shard their common parent "
                        "and not the submodule alone"
                    )
                continue
            if id(mod) in inside:
                raise StateError(
                    f"parameter '{name}' was added to sharded unit '{inside[id(mod)].name}' after it was sharded"
                )
            info = by_id.get(id(p))
            if info is None:
                info = ParamInfo(name=name, tensor=p, requires_grad=p.requires_grad)
                by_id[id(p)] = info
                order.append(info)
            info.locations.append((mod, attr))
    trainable = [i for i in order if i.requires_grad]
    frozen = [i for i in order if not i.requires_grad]
    return trainable + frozen


def set_requires_gradient_sync(module: nn.Module, requires_sync: bool) -> None:
    """Turns gradient reduction on or off for every unit in `module` (gradient accumulation without
    communication, like FSDP2's set_requires_gradient_sync). Unsharded gradients accumulate locally until a
    backward runs with sync on again, which reduces them with its own.

    The locally kept gradients count as the parameters' .grad: zero_grad() (the optimizer's or the module's, or
    setting .grad to None) drops them, so a skipped accumulation window never comes back. An optimizer step or
    tessera.clip_grad_norm_ while some are kept (sync never turned back on) raises tessera.StateError rather than
    step without them. See [Note: local gradients belong to .grad] in csrc/tessera/torch/unit.h.

    Raises InvalidArgumentError if `module` contains no tessera-sharded module."""
    found = False
    for mod in module.modules():
        unit = unit_of(mod)
        if unit is not None:
            unit.requires_grad_sync = bool(requires_sync)
            found = True
    if not found:
        raise InvalidArgumentError(f"module {type(module).__name__} contains no tessera-sharded module")
