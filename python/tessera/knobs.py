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


def load() -> Knobs:
    return Knobs(collective_timeout_s=_float_env("TESSERA_COLLECTIVE_TIMEOUT_S", 600.0))


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a job started by torchrun (or another launcher setting RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
