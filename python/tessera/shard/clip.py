"""Gradient clipping by the global norm across every rank's shards."""

from __future__ import annotations

from time import perf_counter

import torch
import torch.nn as nn

from tessera import _C, knobs
from tessera.errors import InvalidArgumentError, NotSupportedError
from tessera.shard import waits
from tessera.shard.guards import check_local_grads
from tessera.shard.state_dict import units_in


def clip_grad_norm_(module: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scales the sharded gradients so that their global L2 norm is at most `max_norm`, as
    torch.nn.utils.clip_grad_norm_ does on the unsharded model. Returns the norm before clipping.
    Collective: every rank of the units' group must call it."""
    if float(norm_type) != 2.0:
        raise NotSupportedError(f"clip_grad_norm_: norm_type={norm_type} is not supported yet; only 2.0")
    if not max_norm > 0:
        raise InvalidArgumentError(f"clip_grad_norm_: max_norm must be > 0, got {max_norm}")
    units = units_in(module)
    check_local_grads(units, "clip_grad_norm_")
    sharded, replicated, grads = [], [], []
    for unit in units:
        g = [info.sharded.grad for info in unit.params[: unit.num_trainable] if info.sharded.grad is not None]
        grads += g
        (sharded if unit.sharded else replicated).extend(g)
    device = units[0].device
    comm = units[0].comm
    stream = units[0].stream
    sq = _C.squared_norm(sharded, stream) if sharded else torch.zeros(1, device=device)
    sq = sq.to(torch.float64)
    if sharded and comm.size > 1:
        t0 = perf_counter()
        comm.all_reduce_(sq, "sum", timeout_s=knobs.load().collective_timeout_s, stream=stream)
        waits.add(perf_counter() - t0)
    if replicated:
        sq += _C.squared_norm(replicated, stream).to(torch.float64)
    total = sq.sqrt().to(torch.float32).reshape(())
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
