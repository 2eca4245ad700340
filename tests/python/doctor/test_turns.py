"""checks.Turns: interleaved rounds on CPU ranks; a failing round still takes part in every barrier."""

from __future__ import annotations

import pytest

from tessera.doctor.checks import Turns


def test_turns_interleave_and_keep_the_barriers_after_a_failure():
    log = []
    turns = Turns(rank=1, world=3, barrier=lambda: log.append("barrier"))
    calls = iter([ValueError("disk gone"), None])

    def round_():
        log.append("round")
        err = next(calls)
        if err:
            raise err
        return 1.0

    results = [turns.run(round_) for _ in range(2)]
    # Rank 1 of 3 runs in the second slot of each round; after the failure it runs no more rounds but still
    # meets the other ranks at all 3 barriers of each round.
    assert log == ["barrier", "round", "barrier", "barrier"] + ["barrier"] * 3
    assert results == [float("inf"), float("inf")]
    with pytest.raises(ValueError, match="disk gone"):
        turns.check()


def test_alone_runs_at_once():
    turns = Turns.alone()
    assert turns.run(lambda: 2.5) == 2.5
    turns.check()
