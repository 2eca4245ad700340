"""Resolves a torch.distributed group and a device to a tessera Communicator.

CPU parameters use the group itself through the c10d adapter (gloo gives CPU ranks). CUDA parameters use tessera's
own NCCL communicator, bootstrapped by sharing an ncclUniqueId through the default c10d Store.

The c10d adapter diagnoses ranks out of step: a wait longer than knobs.desync_first_deadline_s compares positions
with the other ranks through the default c10d Store and raises tessera.DesyncError naming every rank's position
(TESSERA_DESYNC_CHECK=1 compares every collective before it runs). See csrc/tessera/comm/desync.h.

[Note: tessera's collectives on a group of their own] tessera's CPU collectives never run on the group the user
passed: for each such group, `_own_group` makes one gloo group over the same ranks, so the user's own collectives
(dist.barrier, dist.all_reduce on that group) never pair with tessera's in gloo's issue order, and every tessera
collective is preceded by a header exchange that turns ranks out of step into tessera.DesyncError on every rank
(see [Note: tessera's own group, and a header before every collective] in csrc/tessera/comm/pg/pg_communicator.h).
It is a ProcessGroupGloo over a PrefixStore of the default store, made directly rather than with dist.new_group:
new_group needs every rank of the world to call it with the same ranks (HSDP ranks shard over different groups) and
renumbers the user's later groups, and new_group(use_local_synchronization=True) names groups by their ranks, so it
would collide with a user's group over the same ranks. This module owns it (the adapter holds it weakly): it goes
when the user's group goes, or at exit (an atexit hook, while Python is fully alive; see [Note: the adapter does not
own the group] in pg_communicator.h), except after a desync or timeout, when the C++ side keeps it until the
process ends (destroying it would wait for its pending collective up to its timeout).

[Note: init and training timeouts] Joining a group (every rank must start, load, reach init) and the first step
(allocation, a checkpoint load, warm-up) may take minutes; a steady-state step takes seconds. One timeout for both
is either too short for the start or far too long for a hung peer later. So `set_timeouts(init_s=...)` bounds the
creation of communicators (NCCL: every rank joining), and `set_timeouts(collective_s=...)`, called again after the
first step, caps every collective of every tessera communicator from then on: a stopped or lost peer then fails
the job within that cap (tessera.CommTimeoutError, naming rank, step, collective and unit), through the watchdog
that watches every issued collective (csrc/tessera/comm/watchdog.h; NCCL: the communicator is aborted).
"""

from __future__ import annotations

import atexit
import datetime
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
# User group -> tessera's own gloo group over the same ranks (see [Note: tessera's collectives on a group of their
# own]); the only strong reference to it.
_own_groups: "weakref.WeakKeyDictionary[dist.ProcessGroup, dist.ProcessGroup]" = weakref.WeakKeyDictionary()
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
    store = dist.distributed_c10d._get_default_store()
    return _C.pg_communicator(
        _own_group(group, store, f"tessera/pg/{group.group_name}/{n}/"),
        store=store,
        key_prefix=f"tessera/desync/{group.group_name}/{n}",
        first_deadline_s=k.desync_first_deadline_s,
        strict=k.desync_check,
        user_group=group,
    )


def _own_group(group, store, prefix: str):
    """tessera's own gloo group over the ranks of `group` (see [Note: tessera's collectives on a group of their
    own]), made on first use; every rank of `group` must make it (each meets the others under `prefix` in
    `store`, within the init timeout)."""
    own = _own_groups.get(group)
    if own is not None:
        return own
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    prefixed = dist.PrefixStore(prefix, store)
    timeout = datetime.timedelta(seconds=min(_init_timeout_s, 10 * 365 * 86400))
    backend = dist.ProcessGroupGloo(prefixed, rank, size, timeout=timeout)
    own = dist.ProcessGroup(prefixed, rank, size)
    gloo = dist.ProcessGroup.BackendType.GLOO
    own._register_backend(torch.device("cpu"), gloo, backend)
    own._set_default_backend(gloo)
    own._set_group_name(f"tessera:{group.group_name}")
    own._set_group_desc(f"tessera's collectives for group {group.group_name!r}")
    _own_groups[group] = own
    return own


@atexit.register
def _release_own_groups() -> None:
    # While the interpreter is fully alive: a gloo group torn down during finalization has aborted ranks (see
    # [Note: the adapter does not own the group]).
    _own_groups.clear()


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
