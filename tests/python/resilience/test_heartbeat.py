"""Heartbeats (tessera.resilience.heartbeat) with real processes: a SIGSTOPped rank is reported by the others within
the heartbeat timeout (the collective timeout is 300 s), a rank that finished is not reported, and a rank that
failed ends the others after the timeout (its own exit status first)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tessera import exitcodes

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 4.0  # hb_rank.TIMEOUT_S


def _start(world: int, scenario: str, tmp_path: Path) -> list[subprocess.Popen]:
    store = tmp_path / "store"
    return [subprocess.Popen([sys.executable, str(HERE / "hb_rank.py"), str(r), str(world), str(store), scenario],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
            for r in range(world)]


def _wait_stopped(proc: subprocess.Popen, deadline_s: float) -> float:
    """Polls /proc until `proc` is in state T (stopped); returns the monotonic time it was first seen stopped."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"rank process {proc.pid} did not stop itself within {deadline_s} s")


def test_stopped_rank_is_reported_within_the_heartbeat_timeout(tmp_path):
    procs = _start(3, "stop", tmp_path)
    try:
        stopped_at = _wait_stopped(procs[1], 20)
        ended = {}
        for r in (0, 2):
            procs[r].wait(timeout=TIMEOUT_S + 10)
            ended[r] = time.monotonic() - stopped_at
        for r in (0, 2):
            out, err = procs[r].communicate()
            assert procs[r].returncode == exitcodes.RESTARTABLE, (r, procs[r].returncode, out, err)
            assert "tessera: rank 1 (host " in err and f"pid {procs[1].pid})" in err, err
            assert "has not sent a heartbeat for" in err and "heartbeat_timeout_s=4" in err, err
            # Reported no earlier than the timeout (so the counter really stopped moving) and within a few seconds
            # of it (not at the 300 s collective timeout).
            assert TIMEOUT_S - 1.0 <= ended[r] <= TIMEOUT_S + 5, (r, ended)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
            p.wait()


def test_finished_rank_is_not_reported_by_a_slower_one(tmp_path):
    procs = _start(2, "finish", tmp_path)
    try:
        results = [p.communicate(timeout=3 * TIMEOUT_S + 20) for p in procs]
        for r, (p, (out, err)) in enumerate(zip(procs, results)):
            assert "has not sent a heartbeat" not in err, (r, err)
            assert p.returncode == 0 and "finished" in out, (r, p.returncode, out, err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_failed_rank_ends_the_others_after_the_timeout_leaving_its_own_status_first(tmp_path):
    procs = _start(2, "fail", tmp_path)
    try:
        out0, err0 = procs[0].communicate(timeout=30)
        t0 = time.monotonic()
        out1, err1 = procs[1].communicate(timeout=TIMEOUT_S + 15)
        waited = time.monotonic() - t0
        assert procs[0].returncode == 3, (procs[0].returncode, err0)
        assert procs[1].returncode == exitcodes.RESTARTABLE, (procs[1].returncode, out1, err1)
        assert f"tessera: rank 0 (host " in err1 and f"pid {procs[0].pid}) ended with an error" in err1, err1
        assert TIMEOUT_S - 1.5 <= waited <= TIMEOUT_S + 5, waited  # not at once (rank 0's status goes first)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
