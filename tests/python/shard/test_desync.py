"""Ranks out of step on real gloo ranks: they raise tessera.DesyncError within seconds, naming every rank's
position, instead of each waiting out the 600 s collective timeout; slow ranks at the same collective still get
their result; the strict check (TESSERA_DESYNC_CHECK=1) stops the first diverging collective before it runs."""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import tessera
from conftest import run_ranks
from tessera.process import end_spawned_rank
from tessera.shard import comm as tessera_comm

TIMEOUT_S = 600.0  # the default collective timeout: a desync must be reported long before it


def _cpu_comm():
    return tessera_comm.communicator(dist.group.WORLD, torch.device("cpu"))


def _leave_together(rank: int, world: int, name: str) -> None:
    """Ends a rank whose group holds collectives stuck by a desync. c10d cannot cancel them, and destroying the
    group would wait for them up to the collective timeout, so the ranks meet through the store and leave."""
    store = dist.distributed_c10d._get_default_store()
    store.set(f"test/{name}/left/{rank}", "1")
    store.wait([f"test/{name}/left/{r}" for r in range(world)], datetime.timedelta(seconds=60))
    end_spawned_rank()


def _different_collectives(rank, world):
    comm = _cpu_comm()
    t0 = time.monotonic()
    with pytest.raises(tessera.DesyncError) as info:
        if rank == 0:
            comm.all_gather_into(torch.zeros(8), torch.ones(4), timeout_s=TIMEOUT_S)
        else:
            comm.all_reduce_(torch.ones(4), "sum", timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert elapsed < 20, f"rank {rank} took {elapsed:.1f} s to report the desync: {msg}"
    assert isinstance(info.value, tessera.CommError)
    assert msg.startswith(f"rank {rank}: collectives out of step"), msg
    assert "rank 0 is at #0 all_gather of 4 elements (float32)" in msg, msg
    assert "rank 1 is at #0 all_reduce of 4 elements (float32) sum" in msg, msg
    _leave_together(rank, world, "different")


def test_ranks_at_different_collectives_raise_desync_error_within_seconds(monkeypatch):
    monkeypatch.delenv("TESSERA_DESYNC_CHECK", raising=False)
    monkeypatch.setenv("TESSERA_DESYNC_FIRST_DEADLINE_S", "3")
    run_ranks(2, _different_collectives)


def _slow_rank(rank, world):
    comm = _cpu_comm()
    if rank == 1:
        time.sleep(8.0)  # rank 0 passes its 2 s first deadline and compares notes several times meanwhile
    t = torch.full((4,), float(rank + 1))
    comm.all_reduce_(t, "sum", timeout_s=TIMEOUT_S)
    assert torch.equal(t, torch.full((4,), 3.0))
    if rank == 0:
        time.sleep(3.0)  # now rank 1 waits, with rank 0's note of the first wait still in the store
    out = torch.zeros(8)
    comm.all_gather_into(out, torch.full((4,), float(rank)), timeout_s=TIMEOUT_S)
    assert torch.equal(out, torch.tensor([0.0] * 4 + [1.0] * 4))


def test_slow_rank_at_the_same_collective_is_not_a_desync(monkeypatch):
    monkeypatch.setenv("TESSERA_DESYNC_FIRST_DEADLINE_S", "2")
    run_ranks(2, _slow_rank)


def _strict(rank, world):
    comm = _cpu_comm()
    for i in range(3):  # in step: the check passes and the results are right
        t = torch.full((4,), float(rank + i))
        comm.all_reduce_(t, "sum", timeout_s=TIMEOUT_S)
        assert torch.equal(t, torch.full((4,), float(1 + 2 * i)))
    # Same shape, different collective: gloo would exchange the data without complaint.
    t = torch.full((4,), float(rank + 10))
    t0 = time.monotonic()
    with pytest.raises(tessera.DesyncError) as info:
        if rank == 0:
            comm.all_reduce_(t, "sum", timeout_s=TIMEOUT_S)
        else:
            comm.broadcast_(t, 0, timeout_s=TIMEOUT_S)
    msg = str(info.value)
    assert time.monotonic() - t0 < 10, msg
    assert "before collective #3" in msg, msg
    assert "rank 0 is at #3 all_reduce of 4 elements (float32) sum" in msg, msg
    assert "rank 1 is at #3 broadcast of 4 elements (float32) from root 0" in msg, msg
    assert torch.equal(t, torch.full((4,), float(rank + 10))), "no data may be exchanged by a mismatched collective"


def test_strict_check_stops_the_first_diverging_collective(monkeypatch):
    monkeypatch.setenv("TESSERA_DESYNC_CHECK", "1")
    run_ranks(2, _strict)


class _TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.head = nn.Linear(8, 4)

    def forward(self, x, skip_block_1=False):
        x = self.blocks[0](x)
        if not skip_block_1:  # data-dependent routing, differing across ranks
            x = self.blocks[1](x)
        return self.head(x)


def _unit_skipped(rank, world):
    torch.manual_seed(0)
    model = _TwoBlocks()
    for block in model.blocks:
        tessera.shard(block)
    tessera.shard(model)
    t0 = time.monotonic()
    with pytest.raises(tessera.DesyncError) as info:
        for _ in range(3):  # whichever collective diverges first, the ranks cannot all finish three steps
            model(torch.ones(2, 8), skip_block_1=rank == 1).sum().backward()
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert elapsed < 30, f"rank {rank} took {elapsed:.1f} s: {msg}"
    assert "rank 0 is at #" in msg and "rank 1 is at #" in msg, msg
    # The positions name the units by module path and the pass, from the tags the units give their collectives,
    # e.g. "rank 0 is at #3 backward parameter all-gather of unit 'blocks.1 (Linear)' (all_gather of 36 ...)".
    assert "parameter all-gather of unit 'blocks.1 (Linear)'" in msg, msg
    assert "gradient reduce-scatter of unit '_TwoBlocks'" in msg, msg
    _leave_together(rank, world, "unit")


def test_unit_skipped_on_one_rank(monkeypatch):
    monkeypatch.delenv("TESSERA_DESYNC_CHECK", raising=False)
    monkeypatch.delenv("TESSERA_COLLECTIVE_TIMEOUT_S", raising=False)
    run_ranks(2, _unit_skipped)


def test_desync_knobs(monkeypatch):
    from tessera import knobs

    monkeypatch.delenv("TESSERA_DESYNC_CHECK", raising=False)
    monkeypatch.delenv("TESSERA_DESYNC_FIRST_DEADLINE_S", raising=False)
    monkeypatch.delenv("TESSERA_COLLECTIVE_TIMEOUT_S", raising=False)
    k = knobs.load()
    assert (k.desync_check, k.desync_first_deadline_s, k.collective_timeout_s) == (False, 5.0, 600.0)
    monkeypatch.setenv("TESSERA_DESYNC_CHECK", "on")
    monkeypatch.setenv("TESSERA_DESYNC_FIRST_DEADLINE_S", "0.5")
    assert (knobs.load().desync_check, knobs.load().desync_first_deadline_s) == (True, 0.5)
    monkeypatch.setenv("TESSERA_DESYNC_CHECK", "maybe")
    with pytest.raises(ValueError, match=r"TESSERA_DESYNC_CHECK='maybe' is not a boolean"):
        knobs.load()
    monkeypatch.setenv("TESSERA_DESYNC_CHECK", "0")
    monkeypatch.setenv("TESSERA_DESYNC_FIRST_DEADLINE_S", "0")
    with pytest.raises(ValueError, match=r"TESSERA_DESYNC_FIRST_DEADLINE_S='0' must be > 0"):
        knobs.load()


def test_only_desync_errors_become_desync_error():
    from tessera.errors import from_status

    assert type(from_status(10, "rank 1: collectives out of step on communicator 'x'")) is tessera.DesyncError
    # Aborted from other layers (a checkpoint attempt rank 0 gave up on) keeps its old class.
    assert type(from_status(10, "rank 1: step 3 was not committed")) is tessera.TesseraError
