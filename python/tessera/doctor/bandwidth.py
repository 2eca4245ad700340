"""The figures the field reports for collectives, and the straggler rule.

Collective bandwidth follows nccl-tests (github.com/NVIDIA/nccl-tests, doc/PERFORMANCE.md). For a collective over n
ranks on a buffer of S bytes that took t seconds:
    algbw = S / t                                  (bytes/s; reported in GB/s = 1e9 bytes/s)
    busbw = algbw * 2(n-1)/n   for all_reduce      (each byte crosses the busiest link 2(n-1)/n times in a ring)
    busbw = algbw * (n-1)/n    for all_gather and reduce_scatter
where S is the full buffer: the gathered output of all_gather, the (pre-reduction) input of reduce_scatter, the
buffer of all_reduce. busbw is comparable with the hardware's link bandwidth whatever n is.
"""

from __future__ import annotations

import statistics

from tessera.errors import InvalidArgumentError

# busbw / algbw for n ranks (nccl-tests PERFORMANCE.md).
_BUS_FACTOR = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
}
COLLECTIVES = tuple(_BUS_FACTOR)


def algbw_gbps(nbytes: int, seconds: float) -> float:
    """Algorithm bandwidth in GB/s (1e9 bytes/s): `nbytes` (the full buffer, see the module note) / `seconds`."""
    if seconds <= 0:
        raise InvalidArgumentError(f"algbw: time must be > 0 seconds, got {seconds}")
    return nbytes / seconds / 1e9


def busbw_gbps(collective: str, nbytes: int, seconds: float, world: int) -> float:
    """Bus bandwidth in GB/s of `collective` ("all_reduce", "all_gather", "reduce_scatter") over `world` ranks:
    algbw * 2(n-1)/n for all_reduce, algbw * (n-1)/n for the other two (nccl-tests PERFORMANCE.md)."""
    if collective not in _BUS_FACTOR:
        raise InvalidArgumentError(f"busbw: unknown collective {collective!r}; expected one of {COLLECTIVES}")
    if world < 1:
        raise InvalidArgumentError(f"busbw: world size must be >= 1, got {world}")
    return algbw_gbps(nbytes, seconds) * _BUS_FACTOR[collective](world)


def stragglers(figures: dict[int, float], margin: float) -> tuple[float, set[int]]:
    """(median, flagged ranks) of one check's figures by rank (higher is better): a rank is flagged when its figure
    is more than `margin` (a fraction, e.g. 0.25) below the median of all ranks, i.e. figure < (1 - margin) * median.
    """
    if not 0 <= margin < 1:
        raise InvalidArgumentError(f"margin must be in [0, 1), got {margin}")
    if not figures:
        raise InvalidArgumentError("stragglers: no figures")
    median = statistics.median(figures.values())
    return median, {rank for rank, value in figures.items() if value < (1.0 - margin) * median}
