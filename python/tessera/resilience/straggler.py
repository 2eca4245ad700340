"""Straggler detection: a rank whose compute is far slower than the median rank's over a window of steps.

A rank's compute time of a step = the step's wall time less the seconds it spent waiting in tessera's collectives
(tessera.shard.waits: perf_counter around the schedule calls that block on all-gathers and reduce-scatters, around
clip_grad_norm_'s all-reduce and the loop's own all-reduces). Measuring wall time alone would not work: in a
synchronous job every rank's step takes as long as the slowest rank's, the fast ones spending the difference waiting
at the next collective.

Every `window` steps the ranks all-gather their mean compute time per step (one all-gather of one float64 per rank,
collective: every rank calls `end_step` every step); rank 0 logs each rank above `factor` x the median rank's (statistics.median_low:
for an even number of ranks the lower of the middle two, so that with 2 ranks a slow one is compared with the fast
one; the mean of the two could never be exceeded 2x) and returns the list for metrics.jsonl.

On CUDA the host timer does not see device-side waits: collectives are stream-ordered, so the host rarely blocks in
them and the time a GPU spends waiting for a peer's data is counted as compute. There the comparison is only as good
as the step's wall time after a synchronize (the loop synchronizes); CUDA events around the collectives would be the
exact measure.

Fault injection for tests: TESSERA_SLOW_RANK=R[:SECONDS] (tessera.knobs.slow_rank) makes rank R sleep SECONDS at the
start of each step, inside the measured step.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from tessera import knobs
from tessera.shard import waits


def find_stragglers(compute_s: list[float], factor: float) -> tuple[float, list[dict]]:
    """(median, stragglers) for per-rank mean compute times in seconds per step (index = rank): each rank above
    factor x median (median_low, see the module docstring) as
    {"rank", "compute_s", "median_s", "ratio"}."""
    median = statistics.median_low(compute_s)
    out = [{"rank": r, "compute_s": c, "median_s": median, "ratio": c / median}
           for r, c in enumerate(compute_s) if median > 0 and c > factor * median]
    return median, out


class StragglerMonitor:
    """Times this rank's steps (`begin_step` before, `end_step` after each) and compares ranks every `window`
    steps. `say` prints on rank 0."""

    def __init__(self, *, rank: int, world: int, window: int, factor: float, device: torch.device, say=print):
        self.rank, self.world, self.window, self.factor = rank, world, window, factor
        self.device, self.say = device, say
        slow = knobs.slow_rank()
        self.sleep_s = slow[1] if slow is not None and slow[0] == rank else 0.0
        self._compute_s, self._steps, self._first = 0.0, 0, None
        self._t0 = self._w0 = 0.0

    @classmethod
    def from_config(cls, resilience, *, rank: int, world: int, device: torch.device, say) -> "StragglerMonitor | None":
        if not resilience.straggler_window or world < 2:
            return None
        return cls(rank=rank, world=world, window=resilience.straggler_window, factor=resilience.straggler_factor,
                   device=device, say=say)

    def begin_step(self, step: int) -> None:
        if self._first is None:
            self._first = step
        self._t0, self._w0 = time.perf_counter(), waits.total_s()
        if self.sleep_s:
            time.sleep(self.sleep_s)

    def end_step(self, step: int) -> dict | None:
        """Ends step `step` (after any synchronize). Every `window` steps (collective): on rank 0 a dict for
        metrics.jsonl, {"stragglers": [...], "rank_compute_s": [...]}; otherwise None."""
        self._compute_s += (time.perf_counter() - self._t0) - (waits.total_s() - self._w0)
        self._steps += 1
        if self._steps < self.window:
            return None
        mine = torch.tensor([self._compute_s / self._steps], dtype=torch.float64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)
        first, self._first, self._compute_s, self._steps = self._first, None, 0.0, 0
        if self.rank != 0:
            return None
        compute = [float(t) for t in everyone]
        median, found = find_stragglers(compute, self.factor)
        for s in found:
            self.say(f"straggler: rank {s['rank']} compute {s['compute_s']:.2f} s/step vs median {median:.2f} s "
                     f"({s['ratio']:.1f}x) over steps {first}-{step}")
        return {"stragglers": found, "rank_compute_s": compute}
