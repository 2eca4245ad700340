"""The c10d (pg) Communicator on real gloo ranks: collectives against values computed here, and a timeout that
comes back as tessera.CommTimeoutError instead of a hang."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import tessera
from conftest import run_ranks
from tessera import _C


def _collectives(rank, world):
    comm = _C.pg_communicator(dist.group.WORLD)
    assert (comm.rank, comm.size) == (rank, world) and comm.backend_name == "pg:gloo"
    n = 7  # not a multiple of anything in particular
    mine = lambda r: torch.arange(n, dtype=torch.float64) * (r + 1) + r / 10  # noqa: E731
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = torch.full((n * world,), float("nan"), dtype=dtype)
        comm.all_gather_into(out, mine(rank).to(dtype))
        torch.testing.assert_close(out, torch.cat([mine(r).to(dtype) for r in range(world)]))
        full = lambda r: torch.arange(n * world, dtype=torch.float64) + 100 * r  # noqa: E731
        for op in ("sum", "avg"):
            got = torch.full((n,), float("nan"), dtype=dtype)
            comm.reduce_scatter_into(got, full(rank).to(dtype), op)
            want = sum(full(r)[rank * n : (rank + 1) * n] for r in range(world)) / (world if op == "avg" else 1)
            torch.testing.assert_close(got.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
            t = mine(rank).to(dtype)
            comm.all_reduce_(t, op)
            want = sum(mine(r) for r in range(world)) / (world if op == "avg" else 1)
            torch.testing.assert_close(t.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
        for root in range(world):
            t = mine(rank).to(dtype)
            comm.broadcast_(t, root)
            assert torch.equal(t, mine(root).to(dtype))
    with pytest.raises(tessera.InvalidArgumentError, match=r"all_gather: output has 5 elements, expected world_size"):
        comm.all_gather_into(torch.zeros(5), torch.zeros(n))
    comm.barrier(30.0)


def test_pg_collectives_2_and_3_ranks():
    run_ranks(2, _collectives)
    run_ranks(3, _collectives)


def _timeout(rank, world):
    comm = _C.pg_communicator(dist.group.WORLD)
    if rank == 0:
        t0 = time.monotonic()
        with pytest.raises(tessera.CommTimeoutError) as info:
            comm.all_reduce_(torch.ones(4), "sum", timeout_s=1.0)
        assert time.monotonic() - t0 < 30
        assert "all_reduce of 4 elements (float32) on rank 0 of 2" in str(info.value)
    else:
        time.sleep(3.0)  # never joins the collective


def test_missing_rank_times_out_instead_of_hanging():
    run_ranks(2, _timeout)


def _outlives_group(rank, world):
    import weakref

    model = tessera.shard(torch.nn.Linear(4, 4))
    comm = _C.pg_communicator(dist.group.WORLD)
    group = weakref.ref(dist.group.WORLD)
    model(torch.ones(2, 4)).sum().backward()
    dist.destroy_process_group()
    # tessera keeps neither the Python group nor the C++ ProcessGroup alive: torch.distributed's destroy frees it
    # (and gloo's threads are joined now, not at interpreter shutdown).
    assert group() is None, "a sharded model must not keep its ProcessGroup alive"
    with pytest.raises(tessera.StateError, match=r"process group of this communicator \(rank \d of 2, pg:gloo\) "
                                                 r"was destroyed"):
        comm.barrier(5.0)
    with pytest.raises(tessera.StateError, match="was destroyed"):
        model(torch.ones(2, 4))


def test_model_does_not_keep_a_destroyed_group_alive():
    run_ranks(2, _outlives_group)


def _wait_under_saved_tensor_hooks(rank, world):
    # [Note: never wait on a collective holding the GIL] (csrc/tessera/python/status_py.h): a collective issued under
    # saved_tensors_hooks carries Python objects in its thread-local state, and gloo's worker thread takes the GIL
    # to install them. A binding that waits holding the GIL then deadlocks (CI: reshard timed out after 600 s).
    comm = _C.pg_communicator(dist.group.WORLD)
    unit = _C.Unit(comm, [torch.randn(64, 33)], ["w"], 1, name="Block", timeout_s=10.0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        for _ in range(50):
            unit.start_unshard()
            unit.reshard()  # waits for the all-gather in flight, then frees it
            unit.start_unshard()
            unit.wait_unshard()
            unit.reshard()
    assert unit.state == _C.UnitState.SHARDED


def test_unit_waits_release_the_gil():
    run_ranks(2, _wait_under_saved_tensor_hooks)
