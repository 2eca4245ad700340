"""Starting and restarting jobs: exit statuses that say whether a restart can help (tessera.exitcodes), and
`tessera run --nproc N --max-restarts K` under torch's elastic launcher, where a rank killed with SIGKILL at a
random moment makes the group restart and resume, ending bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist
from same_run import assert_same_run, metrics

from tessera import exitcodes
from tessera.errors import (CheckpointError, CommError, CommTimeoutError, DesyncError, InvalidArgumentError,
                            NotSupportedError)

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
