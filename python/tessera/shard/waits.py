"""A process-wide total of the seconds this process spent waiting in tessera's collectives (perf_counter around the
calls that block on all-gathers, reduce-scatters and all-reduces), so that a step's compute time is its wall time
less this; see tessera.resilience.straggler.

The host clock sees a wait only where the host blocks: on CPU (gloo) every collective. On CUDA the collectives are
ordered on streams and the host rarely blocks, so device-side waits are not counted (and the step's wall time then
needs a synchronize to mean anything). Hooks run on the thread that runs backward; the += is not atomic across
threads, which costs at most a lost sample when two threads add at once (not a correctness concern for a timer)."""

from __future__ import annotations

_total_s = 0.0


def add(seconds: float) -> None:
    global _total_s
    _total_s += seconds


def total_s() -> float:
    """Seconds waited in collectives since the process started (a counter: take differences)."""
    return _total_s
