"""Starting and restarting jobs: exit statuses that say whether a restart can help (tessera.exitcodes), the root
cause deciding a job's status (a deterministic error on one rank is 1 and is not restarted), Ctrl-C stopping every
rank within seconds with 130, and `tessera run --nproc N --max-restarts K` under torch's elastic launcher, where a
rank killed with SIGKILL at a random moment makes the group restart and resume, ending bit-identical to an
uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist
from same_run import assert_same_run, metrics

from tessera import _C, exitcodes
from tessera.errors import (CheckpointError, CommError, CommTimeoutError, DesyncError, InvalidArgumentError,
                            NotSupportedError, ResourceExhaustedError)

REPO = Path(__file__).resolve().parents[3]
DEMO = [str(REPO / "recipes" / "tiny_llama_demo.yaml"), "data.seq_len=32", "training.batch_size=2",
        "training.eval_every=0", "metrics.log_every=1", "checkpoint.export_hf=true", "metrics.prompt="]


def test_exit_status_says_whether_a_restart_can_help():
    assert exitcodes.for_exception(InvalidArgumentError("x")) == exitcodes.BAD_CONFIG
    assert exitcodes.for_exception(NotSupportedError("x")) == exitcodes.BAD_CONFIG
    assert exitcodes.for_exception(CommTimeoutError("x")) == exitcodes.RESTARTABLE
    assert exitcodes.for_exception(CommError("x")) == exitcodes.RESTARTABLE
    assert exitcodes.for_exception(dist.DistNetworkError("x")) == exitcodes.RESTARTABLE
    assert exitcodes.for_exception(DesyncError("x")) == exitcodes.FAILED
    assert exitcodes.for_exception(KeyError("x")) == exitcodes.FAILED
    e = CheckpointError("x")
    e.exit_status = exitcodes.NO_CHECKPOINT
    assert exitcodes.for_exception(e) == exitcodes.NO_CHECKPOINT
    assert exitcodes.restartable(exitcodes.RESTARTABLE) and exitcodes.restartable(128 + signal.SIGKILL)
    assert not exitcodes.restartable(exitcodes.BAD_CONFIG) and not exitcodes.restartable(exitcodes.NO_CHECKPOINT)
    assert exitcodes.for_exception(KeyboardInterrupt()) == exitcodes.INTERRUPTED == 130
    # An error raised because of a restartable one is restartable: a save that failed on a full disk (the
    # Checkpointer re-raises the engine's ResourceExhaustedError as a CheckpointError, `from None`).
    try:
        try:
            raise ResourceExhaustedError("write: file too large")
        except ResourceExhaustedError:
            raise CheckpointError("checkpoint step 4 was not saved") from None
    except CheckpointError as e:
        assert exitcodes.for_exception(e) == exitcodes.RESTARTABLE


def test_the_root_cause_decides_the_job_status():
    RankEnd = exitcodes.RankEnd
    # Rank 1 hit a deterministic error and wrote its cause; rank 0 lost it and failed first (75), rank 2 was killed
    # by the launcher: the job is 1, whichever the launcher saw first.
    ends = [RankEnd(0, 75, reported=True, time=10.5), RankEnd(1, 1, reported=True, time=10.0),
            RankEnd(2, 128 + signal.SIGKILL, by_launcher=True)]
    assert exitcodes.job_status(ends).rank == 1
    assert exitcodes.job_status(list(reversed(ends))).status == exitcodes.FAILED
    # A full disk on rank 1 (75); rank 0's commit then fails with an error that is not classified (1): the job
    # is restartable.
    disk = [RankEnd(0, 1, reported=True, time=5.2), RankEnd(1, 75, reported=True, time=5.0)]
    assert exitcodes.job_status(disk).status == exitcodes.RESTARTABLE
    # A rank killed from outside (no report): the others' errors are its consequence; the job is restartable.
    lost = [RankEnd(0, 1, reported=True, time=3.0), RankEnd(1, 128 + signal.SIGKILL)]
    assert exitcodes.job_status(lost).rank == 1
    assert exitcodes.job_status([RankEnd(0, 0), RankEnd(1, 0)]) is None
    # torch's own gloo collectives raise a lost peer as a plain RuntimeError.
    gone = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:11693: "
                        "Connection reset by peer")
    assert exitcodes.for_exception(gone) == exitcodes.RESTARTABLE


def _tessera(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "tessera", "run", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, **kw)


def test_unreadable_checkpoints_exit_with_no_checkpoint(tmp_path):
    out = tmp_path / "run"
    first = _tessera(*DEMO, "training.steps=2", "checkpoint.every=2", f"output_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    for f in (out / "checkpoints").glob("step-*/*.bin"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated data files: step 2 cannot load
    again = _tessera(*DEMO, "training.steps=4", "checkpoint.every=2", f"output_dir={out}")
    assert again.returncode == exitcodes.NO_CHECKPOINT, (again.returncode, again.stderr[-2000:])
    assert "step-0000000002" in again.stderr or "step 2" in again.stderr, again.stderr[-2000:]


def test_bad_config_exits_2_before_any_rank_starts(tmp_path):
    res = _tessera(*DEMO, "data.source=/nope.jsonl", f"output_dir={tmp_path}", "--max-restarts", "3")
    assert res.returncode == exitcodes.BAD_CONFIG
    assert "/nope.jsonl does not exist" in res.stderr
    assert not list(tmp_path.iterdir())




def test_deterministic_error_on_one_rank_exits_1_and_is_not_restarted(tmp_path):
    # The same RuntimeError on rank 1 at step 2 of every attempt (tessera.recipes.faults kind "raise"): rank 0 then
    # fails its all-gather (75), often before rank 1 has exited. Right: status 1, and no restart.
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"attempt": a, "rank": 1, "kind": "raise", "at": "forward", "step": 2}
                                for a in range(3)]))
    res = _tessera(*DEMO, "data.source=synthetic", "training.steps=4", "checkpoint.every=1",
                   f"output_dir={tmp_path / 'run'}", "--nproc", "2", "--max-restarts", "2",
                   env={"TESSERA_FAULT_PLAN": str(plan)})
    fired = [json.loads(line) for line in Path(f"{plan}.fired.jsonl").read_text().splitlines()]
    assert res.returncode == exitcodes.FAILED, (res.returncode, res.stderr[-3000:])
    assert [f["attempt"] for f in fired if f.get("kind") == "raise"] == [0], (fired, res.stderr[-3000:])
    assert "rank 1 failed with exit status 1" in res.stderr and "a restart cannot help" in res.stderr, \
        res.stderr[-3000:]
    # Every rank's own report says 1 too (srun takes the highest task status, torchrun the first it sees); rank 0's
    # is there unless the agent stopped it first.
    reports = re.findall(r"rank (\d)(?:, exit status| failed \(exit status) (\d+)\)", res.stderr)
    assert ("1", "1") in reports and all(status == "1" for _, status in reports), (reports, res.stderr[-3000:])


def test_ctrl_c_stops_every_rank_within_seconds_with_130(tmp_path):
    # Ctrl-C: SIGINT to the launcher and its ranks (the terminal's process group) after step 3, while a save may be
    # in flight (one every step). Before: 300 s (the collective timeout), then "failed (exit status 1)".
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tessera", "run", *DEMO, "data.source=synthetic",
                             "training.steps=500", "checkpoint.every=1", "checkpoint.keep_last=0",
                             f"output_dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and \
                len([m for m in metrics(out) if "loss" in m]) < 3:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        children = [int(k) for k in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        ranks = [k for k in children if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert len(ranks) == 2, children
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == exitcodes.INTERRUPTED, (proc.returncode, stderr[-3000:])
    assert took < 10, (took, stderr[-3000:])
    assert "interrupted by SIGINT" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "failed" not in stderr, stderr[-3000:]  # before: "rank 0 failed (exit status 1)", 300 s later
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()], "a rank outlived the launcher"
    # Every checkpoint directory that looks committed is whole: listed as committed, every byte verifies, and
    # `latest` names one of them (a save cut off by the interrupt stays a .tmp-* directory).
    ckpts = out / "checkpoints"
    committed = sorted(_C.list_committed_steps(str(ckpts)))
    steps = sorted(int(d.name.split("-")[1]) for d in ckpts.glob("step-*"))
    assert steps and steps == committed, (steps, committed)
    for step in committed:
        _C.CheckpointReader(str(ckpts), step).verify_all()
    assert _C.read_latest(str(ckpts)) in committed


def test_sigint_ends_a_rank_blocked_in_a_c_call_with_130(tmp_path):
    # A rank's main thread blocked in C++ with the GIL released (here a c10d store wait, as in a collective) never
    # sees KeyboardInterrupt before its timeout (60 s here); tessera.process.exit_on_interrupt ends it with 130.
    code = ("import datetime, sys, torch.distributed as dist, tessera\n"
            "assert tessera.process.exit_on_interrupt(grace_s=0.5)\n"
            "store = dist.FileStore(sys.argv[1], 1)\n"
            "store.set_timeout(datetime.timedelta(seconds=60))\n"
            "print('ready', flush=True)\n"
            "store.wait(['never'])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n", proc.communicate()[1][-3000:]
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == exitcodes.INTERRUPTED and time.monotonic() - t0 < 10, (proc.returncode, stderr)
    assert "interrupted (SIGINT)" in stderr, stderr


def _rank_pids(launcher: int) -> list[int]:
    """Worker processes (python -m tessera run) below the launcher process."""
    pids, frontier = [], [launcher]
    while frontier:
        pid = frontier.pop()
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            frontier.append(k)
            try:
                cmd = Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"tessera" in cmd and b"run" in cmd and b"--max-restarts" not in cmd:
                pids.append(k)
    return pids


def test_killed_rank_restarts_the_group_and_ends_bit_identical(tmp_path):
    common = [*DEMO, "training.steps=24", "checkpoint.every=4", "model.lora.rank=4", "model.lora.dropout=0.1",
              "data.source=synthetic"]
    ref = _tessera(*common, f"output_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "elastic"
    rng = random.Random(os.getpid())
    kill_after = rng.randint(5, 18)  # a random step: forward, backward, the optimizer or a save may be running
    proc = subprocess.Popen([sys.executable, "-m", "tessera", "run", *common, f"output_dir={out}", "--nproc", "2",
                             "--max-restarts", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        done = [m["step"] for m in metrics(out) if "loss" in m]
        if killed is None and done and done[-1] >= kill_after:
            pids = _rank_pids(proc.pid)
            if len(pids) == 2:
                killed = (rng.choice(pids), done[-1])
                os.kill(killed[0], signal.SIGKILL)
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    assert killed is not None, f"the job finished before the kill (step {kill_after}):\n{stdout[-2000:]}"
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from checkpoint step" in stdout, stdout[-3000:]
    assert_same_run(tmp_path / "ref", out, killed)
