"""Resolves a torch.distributed group and a device to a tessera Communicator.

CPU parameters use the group itself through the c10d adapter (gloo gives CPU ranks). CUDA parameters use tessera's
own NCCL communicator, bootstrapped by sharing an ncclUniqueId through the default c10d Store.

The c10d adapter diagnoses ranks out of step: a wait longer than knobs.desync_first_deadline_s compares positions
with the other ranks through the default c10d Store and raises tessera.DesyncError naming every rank's position
(TESSERA_DESYNC_CHECK=1 compares every collective before it runs). See csrc/tessera/comm/desync.h.

[Note: init and training timeouts] Joining a group (every rank must start, load, reach init) and the first step
(allocation, a checkpoint load, warm-up) may take minutes; a steady-state step takes seconds. One timeout for both
is either too short for the start or far too long for a hung peer later. So `set_timeouts(init_s=...)` bounds the
creation of communicators (NCCL: every rank joining), and `set_timeouts(collective_s=...)`, called again after the
first step, caps every collective of every tessera communicator from then on: a stopped or lost peer then fails
the job within that cap (tessera.CommTimeoutError, naming rank, step, collective and unit), through the watchdog
that watches every issued collective (csrc/tessera/comm/watchdog.h; NCCL: the communicator is aborted).
"""

from __future__ import annotations

import itertools
import math
import weakref

import torch
import torch.distributed as dist

from tessera import _C, knobs
from tessera.errors import InvalidArgumentError, NotSupportedError

# Keyed weakly by the group object: once torch.distributed drops a group (destroy_process_group), its communicators
# go too, instead of a module-level cache keeping every group alive until interpreter shutdown (where tearing down
# gloo late has aborted a rank). Units hold the communicators they use; the cache lets a model's units share one.
_cache: "weakref.WeakKeyDictionary[dist.ProcessGroup, dict[str, _C.Communicator]]" = weakref.WeakKeyDictionary()
_nccl_counter = itertools.count()
# Per group name: how many pg communicators this process made for it. Every rank of a group makes its
# communicators in the same order (the same model is sharded everywhere), so (group name, count) names one
# communicator identically on every rank: its key prefix in the shared store.
_pg_counters: dict[str, "itertools.count[int]"] = {}
# See [Note: init and training timeouts]; applied to communicators made later too.
_init_timeout_s: float = knobs.DEFAULT_COLLECTIVE_TIMEOUT_S
_collective_cap_s: float = math.inf
_step: int = -1


def _communicators():
    for per_group in list(_cache.values()):
        yield from per_group.values()


def set_timeouts(*, init_s: float | None = None, collective_s: float | None = None) -> None:
    """Sets how long joining a communicator may take (`init_s`, seconds; NCCL: until every rank joined) and a cap
    on every collective of tessera's communicators from now on (`collective_s`, seconds; math.inf: no cap beyond
    each call's own timeout, knobs.collective_timeout_s). Both apply to existing and later communicators. Call it
    again after the first step with the steady-state bound (see [Note: init and training timeouts]). Raises
    InvalidArgumentError for a value that is not > 0."""
    global _init_timeout_s, _collective_cap_s
    for name, value in (("init_s", init_s), ("collective_s", collective_s)):
        if value is not None and not value > 0:
            raise InvalidArgumentError(f"tessera.set_timeouts: {name} must be > 0 seconds, got {value}")
    if init_s is not None:
        _init_timeout_s = float(init_s)
    if collective_s is not None:
        _collective_cap_s = float(collective_s)
        for comm in _communicators():
            comm.timeout_cap_s = _collective_cap_s


def set_step(step: int) -> None:
    """Names training step `step` in the timeout and error messages of every tessera communicator (call it at the
    start of each step; -1: none)."""
    global _step
    _step = int(step)
    for comm in _communicators():
        comm.step = _step


def resolve_group(group):
    """The ProcessGroup `group` means (None = the default group), checked to contain this rank."""
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError(
            "tessera.shard needs torch.distributed: call torch.distributed.init_process_group() first "
            "(torchrun sets it up), or pass group="
        )
    if group is None:
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER or not isinstance(group, dist.ProcessGroup):
        raise InvalidArgumentError(
            f"group {group!r} does not contain rank {dist.get_rank()}: pass a ProcessGroup this rank belongs to"
        )
    if dist.get_rank(group) < 0:
        raise InvalidArgumentError(f"group {group!r} does not contain global rank {dist.get_rank()}")
    return group


def communicator(group, device: torch.device) -> _C.Communicator:
    per_group = _cache.setdefault(group, {})
    comm = per_group.get(str(device))
    if comm is not None:
        return comm
    if device.type == "cpu":
        try:
            group._get_backend(torch.device("cpu"))
        except RuntimeError as e:
            raise InvalidArgumentError(
                f"parameters are on cpu but group {group.group_name!r} has no CPU backend ({e}); "
                "create the group with backend='gloo' or 'cpu:gloo,cuda:nccl'"
            ) from None
        comm = _pg_communicator(group)
    elif device.type == "cuda":
        comm = _nccl_communicator(group, device)
    else:
        raise NotSupportedError(f"parameters on {device} are not supported; expected cpu or cuda")
    comm.timeout_cap_s, comm.step = _collective_cap_s, _step
    per_group[str(device)] = comm
    return comm


def _pg_communicator(group) -> _C.Communicator:
    k = knobs.load()
    n = next(_pg_counters.setdefault(group.group_name, itertools.count()))
    return _C.pg_communicator(
        group,
        store=dist.distributed_c10d._get_default_store(),
        key_prefix=f"tessera/desync/{group.group_name}/{n}",
        first_deadline_s=k.desync_first_deadline_s,
        strict=k.desync_check,
    )


def _nccl_communicator(group, device: torch.device) -> _C.Communicator:
    if not _C.cuda_built():
        raise NotSupportedError("parameters are on CUDA but this build of tessera has no CUDA support")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if size == 1:
        uid = _C.nccl_unique_id()
    else:
        # Every rank of the group computes the same key: the group's name and a per-process creation counter.
        key = f"tessera/nccl_uid/{group.group_name}/{next(_nccl_counter)}"
        store = dist.distributed_c10d._get_default_store()
        if rank == 0:
            uid = _C.nccl_unique_id()
            store.set(key, uid)
        else:
            uid = store.get(key)
    return _C.nccl_communicator(rank, size, uid, device.index if device.index is not None else 0,
                                init_timeout_s=_init_timeout_s)
