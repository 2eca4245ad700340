"""DistributedSampler (coverage per epoch, determinism, exact resume) and split_heldout."""

from __future__ import annotations

import pytest

from tessera.data import DistributedSampler, split_heldout
from tessera.errors import InvalidArgumentError


def test_each_epoch_every_sample_once_across_ranks():
    num, world = 23, 4
    samplers = [DistributedSampler(num, world_size=world, rank=r, seed=7) for r in range(world)]
    per_rank = num // world
    for epoch in range(3):
        shares = [s.next_indices(per_rank) for s in samplers]
        assert all(s.epoch == epoch for s in samplers)
        flat = [i for share in shares for i in share]
        assert len(flat) == len(set(flat)) == per_rank * world  # disjoint, tail of 23 % 4 = 3 dropped
        assert set(flat) <= set(range(num))
    assert shares != [DistributedSampler(num, world_size=world, rank=r, seed=7).next_indices(per_rank)
                      for r in range(world)]  # epochs are shuffled differently


def test_deterministic_and_seeded():
    a = DistributedSampler(100, world_size=2, rank=1, seed=3).next_indices(120)
    assert a == DistributedSampler(100, world_size=2, rank=1, seed=3).next_indices(120)
    assert a != DistributedSampler(100, world_size=2, rank=1, seed=4).next_indices(120)
    assert DistributedSampler(10, world_size=3, rank=1, seed=0, shuffle=False).next_indices(4) == [1, 4, 7, 1]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 7])
def test_resume_from_state_dict_continues_exactly(k):
    # 11 samples on 2 ranks: 5 per rank per epoch; calls of 3 cross the epoch boundary at calls 2, 4, 5 ...
    full = DistributedSampler(11, world_size=2, rank=1, seed=5)
    expected = [full.next_indices(3) for _ in range(10)]
    first = DistributedSampler(11, world_size=2, rank=1, seed=5)
    for _ in range(k):
        first.next_indices(3)
    sd = first.state_dict()
    assert set(sd) == {"epoch", "position", "world_size"}
    resumed = DistributedSampler(11, world_size=2, rank=1, seed=5)
    resumed.load_state_dict(dict(sd))
    assert resumed.epoch == sd["epoch"]
    assert [resumed.next_indices(3) for _ in range(10 - k)] == expected[k:]
    # Loading into a sampler that has moved on (into another epoch) rewinds it exactly too.
    for _ in range(4):
        first.next_indices(3)
    first.load_state_dict(sd)
    assert [first.next_indices(3) for _ in range(10 - k)] == expected[k:]


def test_sampler_errors():
    with pytest.raises(InvalidArgumentError, match=r"3 samples for 4 ranks"):
        DistributedSampler(3, world_size=4, rank=0, seed=0)
    with pytest.raises(InvalidArgumentError, match=r"rank 2 with world_size 2"):
        DistributedSampler(10, world_size=2, rank=2, seed=0)
    s = DistributedSampler(10, world_size=2, rank=0, seed=0)
    with pytest.raises(InvalidArgumentError, match=r"position 6"):
        s.load_state_dict({"epoch": 0, "position": 6})
    with pytest.raises(InvalidArgumentError, match=r"expected \{'epoch'"):
        s.load_state_dict({"epoch": 0})
    # A position from another world size counts rows of another share: refused, naming both sizes.
    saved = DistributedSampler(10, world_size=3, rank=0, seed=0)
    saved.next_indices(2)
    with pytest.raises(InvalidArgumentError, match=r"world of 3 ranks; this sampler \(rank 0\) is in a world of 2"):
        s.load_state_dict(saved.state_dict())
    s.load_state_dict({"epoch": 0, "position": 2})  # saved before world_size was recorded: taken as this world's
    assert s.state_dict() == {"epoch": 0, "position": 2, "world_size": 2}


def test_split_heldout_disjoint_covering_deterministic():
    train, heldout = split_heldout(100, 0.1, seed=1)
    assert len(heldout) == 10 and not set(train) & set(heldout)
    assert sorted(train + heldout) == list(range(100))
    assert (train, heldout) == split_heldout(100, 0.1, seed=1)
    assert heldout != split_heldout(100, 0.1, seed=2)[1]


@pytest.mark.parametrize("n, fraction, n_eval", [(10, 0.0, 0), (2, 0.01, 1), (1, 0.5, 0), (0, 0.5, 0), (5, 0.99, 4),
                                                 (7, 0.3, 2)])
def test_split_heldout_edges(n, fraction, n_eval):
    train, heldout = split_heldout(n, fraction, seed=0)
    assert len(heldout) == n_eval and sorted(train + heldout) == list(range(n))


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_split_heldout_bad_fraction(fraction):
    with pytest.raises(InvalidArgumentError, match=r"0 <= fraction < 1"):
        split_heldout(10, fraction, seed=0)
