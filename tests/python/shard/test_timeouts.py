"""Collective deadlines on CPU ranks (gloo): the first-step bound and the tightened training bound are separate, and
a peer that does not come is reported within the tightened bound with the rank, step, collective and unit named
(see [Note: init and training timeouts] in tessera/shard/comm.py and [Note: the collective watchdog])."""

import time

import pytest
import torch
import torch.nn as nn

import tessera
from conftest import run_ranks


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    for m in model[:2]:
        tessera.shard(m)
    return tessera.shard(model)  # the root unit holds the last layer


def _tightened_after_first_step(rank, world):
    model = _model()
    x = torch.randn(2, 8)
    tessera.set_timeouts(collective_s=60.0)  # the first-step bound
    tessera.set_step(1)
    if rank == 1:
        time.sleep(2.5)  # a slow first step (allocation, a checkpoint load): within its bound
    model(x).sum().backward()

    tessera.set_timeouts(collective_s=1.0)  # steady state
    tessera.set_step(2)
    if rank == 1:
        time.sleep(5.0)  # now the same lateness is a hung peer
        with pytest.raises(tessera.CommError):
            model(x)
        return
    t0 = time.monotonic()
    with pytest.raises(tessera.CommTimeoutError) as info:
        model(x)
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 4.0, elapsed
    msg = str(info.value)
    for part in ("rank 0 of 2", "step 2", "all_gather", "unit '", "1s"):
        assert part in msg, (part, msg)
    # The communicator stays failed (the watchdog kept the failure: our deadline, or gloo's own timeout of the same
    # length, whichever it saw first): the next call fails at once, not after another second.
    t0 = time.monotonic()
    with pytest.raises(tessera.CommError, match="step 2"):
        model(x)
    assert time.monotonic() - t0 < 0.5


def test_training_timeout_is_tightened_after_the_first_step():
    run_ranks(2, _tightened_after_first_step)


def test_set_timeouts_rejects_non_positive():
    with pytest.raises(tessera.InvalidArgumentError, match="collective_s must be > 0"):
        tessera.set_timeouts(collective_s=0)
    with pytest.raises(tessera.InvalidArgumentError, match="init_s must be > 0"):
        tessera.set_timeouts(init_s=-1)
