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


@dataclass(frozen=True, kw_only=True)
class Knobs:
    # Seconds a collective may take before it fails with tessera.CommTimeoutError (TESSERA_COLLECTIVE_TIMEOUT_S).
    collective_timeout_s: float = 600.0
    # Seconds rank 0 waits for every rank's files before a save fails (TESSERA_CHECKPOINT_COMMIT_TIMEOUT_S).
    checkpoint_commit_timeout_s: float = 600.0
    # Fault injection for tests only: a named point of the save where the process kills itself with SIGKILL
    # (TESSERA_CHECKPOINT_CRASH_AT; see csrc/tessera/checkpoint/writer.h). Empty: off.
    checkpoint_crash_point: str = ""


def load() -> Knobs:
    return Knobs(
        collective_timeout_s=_float_env("TESSERA_COLLECTIVE_TIMEOUT_S", 600.0),
        checkpoint_commit_timeout_s=_float_env("TESSERA_CHECKPOINT_COMMIT_TIMEOUT_S", 600.0),
        checkpoint_crash_point=os.environ.get("TESSERA_CHECKPOINT_CRASH_AT", ""),
    )


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a job started by torchrun (or another launcher setting RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
