"""Ranks out of step on real gloo ranks: they raise tessera.DesyncError within seconds, naming every rank's
position, instead of each waiting out the 600 s collective timeout or having gloo pair mismatched collectives (a
SIGABRT); a peer blocked in a collective of the user's own is named; slow ranks at the same collective still get
their result; the strict check (TESSERA_DESYNC_CHECK=1) stops the first diverging collective before it runs."""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist

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


def _tiny_hf_llama():
    """A tiny transformers Llama sharded per layer, then the root, as a new user would."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        tessera.shard(layer)
    tessera.shard(model)
    tessera.set_timeouts(collective_s=30)  # before the fix, (a) waited this out
    return model, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _eval_while_peer_in_barrier(rank, world):
    model, ids = _tiny_hf_llama()
    if rank == 1:
        dist.barrier()  # rank 0 releases it once it has raised
    else:
        t0 = time.monotonic()
        with pytest.raises(tessera.DesyncError) as info:
            with torch.no_grad():
                model(ids)  # an evaluation forward on rank 0 only
        elapsed = time.monotonic() - t0
        msg = str(info.value)
        # First deadline 2 s, then two more answers from rank 1's responder (1 s apart): about 5 s.
        assert elapsed < 12, f"took {elapsed:.1f} s: {msg}"
        assert "rank 0: collectives out of step" in msg, msg
        assert "rank 0 is at #0 forward parameter all-gather of unit 'LlamaForCausalLM'" in msg, msg
        assert ("rank 1 is not in a tessera collective: it issued 1 collectives of its own (e.g. dist.barrier) on "
                "group '0' (the group given to tessera.shard) where this rank issued 0, so it is blocked") in msg, msg
        dist.barrier()
    _leave_together(rank, world, "barrier")


def test_peer_blocked_in_its_own_barrier_is_named_within_seconds(monkeypatch):
    monkeypatch.delenv("TESSERA_DESYNC_CHECK", raising=False)
    monkeypatch.setenv("TESSERA_DESYNC_FIRST_DEADLINE_S", "2")
    run_ranks(2, _eval_while_peer_in_barrier)


def _eval_on_one_rank_then_train(rank, world):
    model, ids = _tiny_hf_llama()
    if rank == 0:
        with torch.no_grad():
            model(ids)  # rank 1 skips the evaluation: from here on the ranks are out of step
    t0 = time.monotonic()
    with pytest.raises(tessera.DesyncError) as info:
        model(ids, labels=ids).loss.backward()
    msg = str(info.value)
    # Before the fix gloo paired the mismatched collectives and rank 0 died with SIGABRT (run_ranks reports it).
    assert time.monotonic() - t0 < 10, msg
    assert f"rank {rank}: collectives out of step" in msg, msg
    # The positions name the units by module path and the pass, from the tags the units give their collectives.
    # Rank 0's 3 evaluation all-gathers paired with rank 1's training forward; the next one differs.
    assert "before collective #3, before any of its data moved" in msg, msg
    assert "rank 0 is at #3 forward parameter all-gather of unit 'LlamaForCausalLM' (all_gather of 2064" in msg, msg
    assert ("rank 1 is at #3 backward parameter all-gather of unit 'model.layers.1 (LlamaDecoderLayer)' "
            "(all_gather of 4640") in msg, msg
    with pytest.raises(tessera.DesyncError, match="unusable from now on"):  # nothing is paired after it either
        model(ids)
    _leave_together(rank, world, "eval")


def test_evaluation_on_one_rank_then_training_raises_desync_error_on_every_rank(monkeypatch):
    monkeypatch.delenv("TESSERA_DESYNC_CHECK", raising=False)
    monkeypatch.delenv("TESSERA_COLLECTIVE_TIMEOUT_S", raising=False)
    run_ranks(2, _eval_on_one_rank_then_train)


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
