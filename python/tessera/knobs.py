"""Every environment override tessera reads, in one place (precedence: explicit argument > environment > default).

Nothing else in tessera calls os.environ for configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"environment variable {name}={raw!r} must be > 0")
    return value


@dataclass(frozen=True)
class CrashPoint:
    """Fault injection for tests only (TESSERA_CHECKPOINT_CRASH_AT="POINT[@STEP][#RANK]"): the process kills itself
    with SIGKILL at POINT (a name from csrc/tessera/checkpoint/writer.h, checked by the writer) of the save of STEP
    (None: every save) on rank RANK (None: every rank)."""

    point: str
    step: int | None = None
    rank: int | None = None


def parse_crash_point(name: str, raw: str) -> CrashPoint | None:
    """CrashPoint from "POINT[@STEP][#RANK]" (None for ""); ValueError naming the variable if malformed."""
    if raw == "":
        return None
    head, _, rank_s = raw.partition("#")
    point, _, step_s = head.partition("@")

    def number(text: str, what: str) -> int:
        if not text.isdigit():
            raise ValueError(f"environment variable {name}={raw!r}: {what} {text!r} is not a non-negative integer "
                             "(expected POINT[@STEP][#RANK], e.g. after_data@4#1)")
        return int(text)

    if not point:
        raise ValueError(f"environment variable {name}={raw!r}: no crash point name (expected POINT[@STEP][#RANK])")
    return CrashPoint(point, number(step_s, "step") if "@" in head else None,
                      number(rank_s, "rank") if "#" in raw else None)


@dataclass(frozen=True, kw_only=True)
class Knobs:
    # Seconds a collective may take before it fails with tessera.CommTimeoutError (TESSERA_COLLECTIVE_TIMEOUT_S).
    collective_timeout_s: float = 600.0
    # Seconds rank 0 waits for every rank's files before a save fails (TESSERA_CHECKPOINT_COMMIT_TIMEOUT_S).
    checkpoint_commit_timeout_s: float = 600.0
    # Fault injection for tests only: where a save kills its process (TESSERA_CHECKPOINT_CRASH_AT; see CrashPoint).
    # None: off.
    checkpoint_crash_point: CrashPoint | None = None


def load() -> Knobs:
    return Knobs(
        collective_timeout_s=_float_env("TESSERA_COLLECTIVE_TIMEOUT_S", 600.0),
        checkpoint_commit_timeout_s=_float_env("TESSERA_CHECKPOINT_COMMIT_TIMEOUT_S", 600.0),
        checkpoint_crash_point=parse_crash_point("TESSERA_CHECKPOINT_CRASH_AT",
                                                 os.environ.get("TESSERA_CHECKPOINT_CRASH_AT", "")),
    )


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a job started by torchrun (or another launcher setting RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
