"""Fault injection for the fault suite (tests and benchmarks/fault_suite.py only; never in a normal run).

A fault plan is a JSON list of faults, named by TESSERA_FAULT_PLAN (tessera.knobs.fault_plan_path). Each fault
applies to one attempt of the job (TORCHELASTIC_RESTART_COUNT; 0 without a launcher that restarts), on one rank:

    {"attempt": 2, "rank": 1, "kind": "kill", "at": "backward", "step": 7}

kinds and moments:
  kill        SIGKILL of this rank at `at` of step `step`: forward (entering the model's forward), backward (the
              middle layer's gradient, so half of the reduce-scatters were issued), optimizer (parameters updated,
              nothing logged or saved), save (at checkpoint crash point `point` of the save of `step`, one of
              csrc/tessera/checkpoint/writer.h's: after_data, after_index, before_manifest, after_manifest,
              after_rename), load (half of the checkpoint's tensors applied; `step` ignored)
  stop        SIGSTOP of this rank at `at` (forward, backward, optimizer) of step `step`: a hung rank, found by the
              other ranks' heartbeat checks (tessera.resilience.heartbeat)
  full_disk   RLIMIT_FSIZE of `bytes` (default 64 KiB) on this rank from the start of step `step`: the next save
              fails with ENOSPC-like EFBIG on its data file
  corrupt     flips one byte in the middle of the largest data file of the newest committed checkpoint, then
              SIGKILL at `at` of step `step` (the restart must skip that checkpoint for the previous one)
  raise       a Python exception (RuntimeError) raised in the training code of this rank at `at` (forward,
              backward, optimizer) of step `step`: a deterministic error, which a restart cannot help

Every fault is a real one: real signals, a real resource limit, a real damaged file. Before a fault fires, the rank
appends {"attempt", "rank", "kind", "at", "step", "time"} (wall-clock seconds) to `<plan>.fired.jsonl`, and rank 0
appends {"attempt", "event": "first_step", "time"} when an attempt's first step is done, so the benchmark can measure
detection and restart latency.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tessera import knobs
from tessera.errors import InvalidArgumentError

KINDS = {"kill": ("forward", "backward", "optimizer", "save", "load"),
         "stop": ("forward", "backward", "optimizer"),
         "full_disk": ("step",),
         "corrupt": ("forward", "backward", "optimizer"),
         "raise": ("forward", "backward", "optimizer")}
SAVE_POINTS = ("after_data", "after_index", "before_manifest", "after_manifest", "after_rename")
RANK0_SAVE_POINTS = ("before_manifest", "after_manifest", "after_rename")  # only rank 0 commits (writer.h)


@dataclass(frozen=True)
class Fault:
    attempt: int
    rank: int
    kind: str
    at: str
    step: int = 0
    point: str = ""  # kill at save: the writer's crash point
    bytes: int = 64 * 1024  # full_disk: the file size limit


def load_plan(path: str | os.PathLike) -> list[Fault]:
    """The faults in the JSON file at `path`; InvalidArgumentError naming the entry for a malformed one."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"fault plan {path}: cannot read it as JSON ({e})") from None
    faults = []
    for i, entry in enumerate(raw if isinstance(raw, list) else [None]):
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"fault plan {path}: entry {i} is not an object")
        entry = {"at": "step", **entry} if entry.get("kind") == "full_disk" else entry
        try:
            f = Fault(**entry)
        except TypeError as e:
            raise InvalidArgumentError(f"fault plan {path}: entry {i} {entry}: {e}") from None
        if f.at not in KINDS.get(f.kind, ()):
            raise InvalidArgumentError(f"fault plan {path}: entry {i}: kind {f.kind!r} at {f.at!r} is not one of "
                                       f"{ {k: list(v) for k, v in KINDS.items()} }")
        if f.kind == "kill" and f.at == "save" and f.point not in SAVE_POINTS:
            raise InvalidArgumentError(f"fault plan {path}: entry {i}: a kill at save needs point in {SAVE_POINTS}")
        if f.kind == "kill" and f.at == "save" and f.point in RANK0_SAVE_POINTS and f.rank != 0:
            raise InvalidArgumentError(f"fault plan {path}: entry {i}: crash point {f.point!r} is reached by rank 0 "
                                       f"only (it commits), not by rank {f.rank}: it would never fire")
        faults.append(f)
    return faults


class FaultInjector:
    """The faults of this attempt on this rank, fired from the loop's hooks (see Job.train_step)."""

    def __init__(self, faults: list[Fault], *, rank: int, attempt: int, plan_path: str, checkpoint_dir: str):
        self.faults = [f for f in faults if f.rank == rank and f.attempt == attempt]
        self.rank, self.attempt, self.checkpoint_dir = rank, attempt, checkpoint_dir
        self.fired_log = f"{plan_path}.fired.jsonl"
        self.step = 0

    @classmethod
    def from_knobs(cls, *, rank: int, checkpoint_dir: str) -> "FaultInjector | None":
        path = knobs.fault_plan_path()
        if path is None:
            return None
        w = knobs.elastic_worker()
        return cls(load_plan(path), rank=rank, attempt=w.restart_count if w else 0, plan_path=str(path),
                   checkpoint_dir=checkpoint_dir)

    def crash_point(self) -> knobs.CrashPoint | None:
        """The Checkpointer crash point of this attempt (kill at save or load), if any."""
        from tessera.checkpoint.checkpointer import LOAD_CRASH_POINT

        for f in self.faults:
            if f.kind == "kill" and f.at == "save":
                return knobs.CrashPoint(f.point, f.step, self.rank)
            if f.kind == "kill" and f.at == "load":
                return knobs.CrashPoint(LOAD_CRASH_POINT, None, self.rank)
        return None

    def before_save(self, step: int) -> None:
        """Records the kill planned in the save of `step` (its crash, inside the writer, cannot write first)."""
        for f in self.faults:
            if f.kind == "kill" and f.at == "save" and f.step == step:
                self._record(f)

    def before_load(self) -> None:
        """Records the kill planned in this attempt's checkpoint load."""
        for f in self.faults:
            if f.kind == "kill" and f.at == "load":
                self._record(f)

    def begin_step(self, step: int) -> None:
        self.step = step
        for f in self.faults:
            if f.kind == "full_disk" and f.step == step:
                self._record(f)
                resource.setrlimit(resource.RLIMIT_FSIZE, (f.bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def at(self, moment: str) -> None:
        """Fires this step's faults planned at `moment` (forward, backward, optimizer)."""
        for f in self.faults:
            if f.step != self.step or f.at != moment or f.kind not in ("kill", "stop", "corrupt", "raise"):
                continue
            self._record(f)
            if f.kind == "raise":
                raise RuntimeError(f"fault injection: a deterministic error on rank {self.rank} at {moment} of step "
                                   f"{self.step}")
            if f.kind == "corrupt":
                corrupt_newest(self.checkpoint_dir)
            os.kill(os.getpid(), signal.SIGSTOP if f.kind == "stop" else signal.SIGKILL)

    def mark(self, event: str) -> None:
        """Appends {"attempt", "rank", "event", "time"} to the fired log (the benchmark's restart time: "first_step",
        the first step of an attempt finished)."""
        self._append({"attempt": self.attempt, "rank": self.rank, "event": event, "time": time.time()})

    def _record(self, f: Fault) -> None:
        self._append({"attempt": f.attempt, "rank": f.rank, "kind": f.kind, "at": f.at, "step": f.step,
                      "time": time.time()})

    def _append(self, entry: dict) -> None:
        with open(self.fired_log, "a") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()
            os.fsync(out.fileno())


def corrupt_newest(checkpoint_dir: str) -> Path | None:
    """Flips one byte in the middle of the largest file of the newest committed checkpoint (step-* directory);
    returns that file (None when there is no checkpoint)."""
    steps = sorted((p for p in Path(checkpoint_dir).glob("step-*") if p.is_dir()),
                   key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name.rsplit("-", 1)[1].isdigit() else -1)
    if not steps:
        return None
    files = sorted((p for p in steps[-1].rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    target = files[-1]
    with open(target, "r+b") as f:
        f.seek(target.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    return target
