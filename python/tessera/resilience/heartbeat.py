"""Heartbeats through the c10d store: a rank that stops (SIGSTOP, a frozen host, a cut link) is reported by the
others within `timeout_s`, instead of after the collective timeout (minutes; on NCCL possibly never).

Each rank runs a daemon thread that, every `interval_s` seconds:
  1. bumps its own counter key `tessera/heartbeat/<rank>` with `store.add(key, 1)` (one round trip), and
  2. reads the counters of the ranks it watches with one `store.multi_get` (one round trip; c10d's base Store loops
     `get` for stores without a native multi-get, still one call here).
A watched counter that has not changed for `timeout_s` seconds *by this process's monotonic clock* means that rank is
not beating: this process prints who (rank, host, pid) on stderr and ends with status 75 (RESTARTABLE). Only
counters are compared, never timestamps: wall clocks of different hosts disagree, and a monotonic clock is only
meaningful inside one process.

Cost: rank r watches its next min(W - 1, WATCH_AT_MOST) ranks (r+1, r+2, ... mod W), so every rank is watched by
that many others. Per interval each rank makes 2 store round trips (one add, one multi_get of up to WATCH_AT_MOST
keys), so the store serves 2 W requests and W x min(W - 1, WATCH_AT_MOST) key reads per interval: at W = 1024 and
the default 2 s interval, 1024 requests/s and 8k key reads/s, where watching everyone would be 524k key reads/s.
With a FileStore (file:// init) every add appends one line to the file (about 30 bytes): 8 ranks beating every 2 s
for a day add about 10 MB.

The end of a job: a rank that finished sets its counter to "done" (a rank that failed, "failed") before it leaves,
so a slower peer does not report it as stopped. A peer that failed is reported after `timeout_s` (status 75): on
NCCL the others would otherwise wait on it until their collective timeout; not at once, so that the failed rank's
own status (say 3, no loadable checkpoint: a restart cannot help) reaches the launcher first, and on gloo the
others' collectives fail by themselves meanwhile.

A store that fails (the elastic agent that hosts it is gone, rank 0 hosting a TCPStore is stopped) is itself a
reason to exit 75: a second thread, which never touches the store, ends the process when the heartbeat thread has
not finished a round for `timeout_s` (a store call blocked on a stopped host), and the heartbeat thread ends it when
a store call raises.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable

from tessera import exitcodes
from tessera.process import end_failed_rank

WATCH_AT_MOST = 16  # successors each rank watches; see the cost in the module docstring
_PREFIX = "tessera/heartbeat"
_DONE, _FAILED = b"done", b"failed"


# Why os._exit (tessera.process.end_failed_rank) from a helper thread: when a peer stops, the main thread is usually
# blocked inside a collective (C++ with the GIL released) that returns only at its timeout. sys.exit in a thread ends
# only that thread; _thread.interrupt_main and signal handlers run only when the main thread gets back to Python
# bytecode, which is exactly what it cannot do. os._exit skips exit hooks and finalizers: an in-flight checkpoint save
# is abandoned uncommitted (the commit protocol never exposes it), and the restarted job resumes from the last
# committed one.


class Heartbeat:
    """This rank's heartbeat and its watch over other ranks' heartbeats (see the module docstring).

    `store` is the c10d store the process group was built on (for the elastic path, the per-restart PrefixStore, so
    a previous attempt's counters are never read). `on_lost(message)` is what happens when a peer is lost or the
    store fails; the default prints the message and ends the process with status 75 (tests pass their own)."""

    def __init__(self, store, rank: int, world: int, *, interval_s: float, timeout_s: float,
                 on_lost: Callable[[str], None] | None = None):
        if interval_s <= 0 or timeout_s < 2 * interval_s:
            raise ValueError(f"heartbeat: need interval_s > 0 and timeout_s >= 2 x interval_s, got interval_s="
                             f"{interval_s}, timeout_s={timeout_s}")
        self.store, self.rank, self.world = store, rank, world
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.watched = [(rank + i) % world for i in range(1, min(world, WATCH_AT_MOST + 1))]
        self._keys = [f"{_PREFIX}/{r}" for r in self.watched]
        self._lost_fn = on_lost or self._report_and_exit
        self._stop = threading.Event()
        self._round_done = time.monotonic()  # when the beat thread last finished a round (read by the watchdog)
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> "Heartbeat":
        """Publishes who this rank is and its first beat, then starts the threads. Returns self."""
        self.store.set(f"{_PREFIX}/{self.rank}/who", f"{socket.gethostname()} {os.getpid()}")
        self.store.add(f"{_PREFIX}/{self.rank}", 1)
        self._round_done = time.monotonic()
        for target, name in ((self._beat_loop, "beat"), (self._watchdog_loop, "watchdog")):
            t = threading.Thread(target=target, name=f"tessera-heartbeat-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, *, finished: bool) -> None:
        """Stops beating and watching; then publishes "done" (`finished`) or "failed", so peers still running do
        not report this rank as stopped. A store that fails here is ignored: this rank is leaving anyway."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s)  # a store call blocked on a lost host must not hold up the exit
        self._threads = []
        try:
            self.store.set(f"{_PREFIX}/{self.rank}", _DONE if finished else _FAILED)
        except Exception:  # noqa: BLE001 - see the docstring
            pass

    # ---- threads ---------------------------------------------------------------------------------------------

    def _beat_loop(self) -> None:
        own = f"{_PREFIX}/{self.rank}"
        last = {r: None for r in self.watched}  # last counter value seen, and when it changed (monotonic s)
        changed = {r: time.monotonic() for r in self.watched}
        failed_at: dict[int, float] = {}  # when a watched rank was first seen "failed"
        try:
            while not self._stop.wait(self.interval_s):
                self.store.add(own, 1)
                values = self._read_watched()
                now = time.monotonic()
                for r, v in zip(self.watched, values):
                    if v == _DONE:
                        continue
                    if v == _FAILED:  # see "The end of a job" in the module docstring for the wait
                        if now - failed_at.setdefault(r, now) >= self.timeout_s:
                            return self._on_lost(f"tessera: rank {r} ({self._who(r)}) ended with an error (see its "
                                                 f"own message); rank {self.rank} stops too (exit status "
                                                 f"{exitcodes.RESTARTABLE})")
                        continue
                    if v != last[r]:
                        last[r], changed[r] = v, now
                    elif now - changed[r] >= self.timeout_s:
                        return self._on_lost(
                            f"tessera: rank {r} ({self._who(r)}) has not sent a heartbeat for {now - changed[r]:.1f} s "
                            f"(heartbeat_timeout_s={self.timeout_s:g}): stopped, frozen or cut off; reported by rank "
                            f"{self.rank}, which exits with status {exitcodes.RESTARTABLE}")
                self._round_done = now
        except Exception as e:  # noqa: BLE001 - any store failure: the store's host (agent or rank 0) is gone
            if not self._stop.is_set():
                self._on_lost(f"tessera: rank {self.rank}: the c10d store failed during a heartbeat ({e}); the "
                              f"agent or rank hosting it is gone: exit status {exitcodes.RESTARTABLE}")

    def _read_watched(self) -> list:
        """The watched ranks' counters (bytes): one multi_get once every key exists; before that (ranks still
        starting), one check per key, and a missing key reads as None (not heard from yet)."""
        if self.store.check(self._keys):
            return self.store.multi_get(self._keys)
        return [self.store.get(k) if self.store.check([k]) else None for k in self._keys]

    def _watchdog_loop(self) -> None:
        # Never touches the store: it is what notices a store call that blocks (a stopped host serving the store).
        while not self._stop.wait(self.interval_s):
            stalled = time.monotonic() - self._round_done
            if stalled >= self.timeout_s + self.interval_s:
                return self._on_lost(f"tessera: rank {self.rank}: the c10d store has not answered a heartbeat for "
                                     f"{stalled:.1f} s (heartbeat_timeout_s={self.timeout_s:g}); the agent or rank "
                                     f"hosting it is stopped or cut off: exit status {exitcodes.RESTARTABLE}")

    def _who(self, r: int) -> str:
        key = f"{_PREFIX}/{r}/who"
        try:
            if not self.store.check([key]):  # never started: get would block until the store's timeout
                return "host ?, pid ?: it never sent a heartbeat"
            host, pid = self.store.get(key).decode().split(" ", 1)
            return f"host {host}, pid {pid}"
        except Exception:  # noqa: BLE001 - the report matters more than the detail
            return "host ?, pid ?"

    def _on_lost(self, message: str) -> None:
        self._stop.set()  # one report: the other thread stands down
        self._lost_fn(message)

    @staticmethod
    def _report_and_exit(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        end_failed_rank(exitcodes.RESTARTABLE)


def start(store, rank: int, world: int, resilience) -> Heartbeat | None:
    """Starts this rank's heartbeat from the config's `resilience` section; None when heartbeat_timeout_s is 0 or
    the job has one rank."""
    if not resilience.heartbeat_timeout_s or world < 2:
        return None
    return Heartbeat(store, rank, world, interval_s=resilience.heartbeat_interval_s,
                     timeout_s=resilience.heartbeat_timeout_s).start()
