"""Every environment override tessera reads, in one place (precedence: explicit argument > environment > default).

Nothing else in tessera calls os.environ for configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


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


def _bool_env(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean; expected 1/0, true/false, yes/no, on/off")


# The one default bound on a collective; the C++ core's twin is comm::kDefaultCollectiveTimeout (communicator.h).
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
# How long a wait runs before the ranks compare positions to tell a desync from slowness; the C++ twin is
# comm::kDefaultDesyncFirstDeadline (comm/desync.h). A few seconds: long enough that healthy collectives never pay
# for the comparison, short enough that a desync is reported long before the collective timeout.
DEFAULT_DESYNC_FIRST_DEADLINE_S = 5.0
# How long rank 0 waits for every rank's files before a save fails; the C++ twin is WriterOptions::commit_timeout.
DEFAULT_CHECKPOINT_COMMIT_TIMEOUT_S = 600.0


def default_cache_dir() -> Path:
    """~/.cache/tessera: where `tessera fetch` keeps models and their downloads (outside any repository)."""
    return Path.home() / ".cache" / "tessera"


def _path_env(name: str, default: Path) -> Path:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return Path(raw).expanduser()


@dataclass(frozen=True, kw_only=True)
class Knobs:
    # Seconds a collective may take before it fails with tessera.CommTimeoutError (TESSERA_COLLECTIVE_TIMEOUT_S).
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    # Seconds a collective waits before the ranks compare where each one is, so that ranks at different collectives
    # fail at once with tessera.DesyncError (TESSERA_DESYNC_FIRST_DEADLINE_S). See comm/desync.h.
    desync_first_deadline_s: float = DEFAULT_DESYNC_FIRST_DEADLINE_S
    # Compare every collective's (seq, kind, count, dtype, tag) across ranks before it runs, so a mismatch is
    # reported at the first diverging collective; costs a few store round trips per collective (TESSERA_DESYNC_CHECK).
    desync_check: bool = False
    # Seconds rank 0 waits for every rank's files before a save fails (TESSERA_CHECKPOINT_COMMIT_TIMEOUT_S).
    checkpoint_commit_timeout_s: float = DEFAULT_CHECKPOINT_COMMIT_TIMEOUT_S
    # Fault injection for tests only: where a save kills its process (TESSERA_CHECKPOINT_CRASH_AT; see CrashPoint).
    # None: off.
    checkpoint_crash_point: CrashPoint | None = None
    # Root of tessera's download cache (TESSERA_CACHE_DIR, default ~/.cache/tessera): fetched models live in
    # <cache_dir>/models/<name>/, the pinned files they are built from in <cache_dir>/downloads/.
    cache_dir: Path = field(default_factory=default_cache_dir)
    # Where the RAPL powercap zones are (TESSERA_POWERCAP_ROOT, default /sys/class/powercap); tests point it at a
    # fake tree. See tessera/metrics/energy.py.
    powercap_root: Path = Path("/sys/class/powercap")


def load() -> Knobs:
    return Knobs(
        collective_timeout_s=_float_env("TESSERA_COLLECTIVE_TIMEOUT_S", DEFAULT_COLLECTIVE_TIMEOUT_S),
        desync_first_deadline_s=_float_env("TESSERA_DESYNC_FIRST_DEADLINE_S", DEFAULT_DESYNC_FIRST_DEADLINE_S),
        desync_check=_bool_env("TESSERA_DESYNC_CHECK", False),
        checkpoint_commit_timeout_s=_float_env("TESSERA_CHECKPOINT_COMMIT_TIMEOUT_S", DEFAULT_CHECKPOINT_COMMIT_TIMEOUT_S),
        checkpoint_crash_point=parse_crash_point("TESSERA_CHECKPOINT_CRASH_AT",
                                                 os.environ.get("TESSERA_CHECKPOINT_CRASH_AT", "")),
        cache_dir=_path_env("TESSERA_CACHE_DIR", default_cache_dir()),
        powercap_root=_path_env("TESSERA_POWERCAP_ROOT", Path("/sys/class/powercap")),
    )


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a job started by torchrun (or another launcher setting RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_local_rank() -> int:
    """This process's LOCAL_RANK under torchrun (its GPU index on the node); 0 when unset."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def torchrun_local_world_size() -> int:
    """LOCAL_WORLD_SIZE under torchrun (ranks on this node); 1 when unset."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def torchrun_rank() -> int:
    """This process's RANK under torchrun; 0 when unset."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class ElasticWorker:
    """What torch's elastic agent tells a worker (torchrun): where the agent's c10d store is, this worker's rank
    and world size, and which restart of the group this is (TORCHELASTIC_RESTART_COUNT)."""

    master_addr: str
    master_port: int
    rank: int
    world_size: int
    restart_count: int


def elastic_worker() -> ElasticWorker | None:
    """The elastic agent's settings when this process is a worker that uses the agent's store, else None."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return ElasticWorker(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["RANK"]),
                         int(os.environ["WORLD_SIZE"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def doctor_slow_rank() -> int | None:
    """Fault injection for tests only (TESSERA_DOCTOR_SLOW_RANK=R): `tessera doctor` makes rank R's GEMM check
    sleep 3x its compute time, so that rank's TFLOP/s drops to a quarter and it is flagged. None (unset): off."""
    raw = os.environ.get("TESSERA_DOCTOR_SLOW_RANK", "")
    if raw == "":
        return None
    if not raw.isdigit():
        raise ValueError(f"environment variable TESSERA_DOCTOR_SLOW_RANK={raw!r} is not a rank (a non-negative "
                         "integer)")
    return int(raw)


def fault_plan_path() -> Path | None:
    """Fault injection for tests and benchmarks only (TESSERA_FAULT_PLAN=FILE): the JSON fault plan that
    tessera.recipes.faults fires in `tessera run` (kills, stops, a full disk, a corrupted checkpoint at named
    moments of named steps, per restart attempt). None (unset): off."""
    raw = os.environ.get("TESSERA_FAULT_PLAN", "")
    return Path(raw) if raw else None


def slow_rank() -> tuple[int, float] | None:
    """Fault injection for tests only (TESSERA_SLOW_RANK=R[:SECONDS], SECONDS default 0.5): in `tessera run`, rank R
    sleeps SECONDS at the start of every training step, inside the time tessera.resilience.straggler measures, so
    that rank is logged as a straggler. None (unset): off."""
    raw = os.environ.get("TESSERA_SLOW_RANK", "")
    if raw == "":
        return None
    rank_s, _, seconds_s = raw.partition(":")
    try:
        rank, seconds = int(rank_s), float(seconds_s) if seconds_s else 0.5
    except ValueError:
        rank, seconds = -1, -1.0
    if rank < 0 or not seconds > 0:
        raise ValueError(f"environment variable TESSERA_SLOW_RANK={raw!r}: expected R[:SECONDS], a rank (a "
                         "non-negative integer) and seconds > 0, e.g. 1:0.3")
    return rank, seconds
