"""Real faults: kill -9 during a save, at every point of persist and commit. The next run loads the previous good
checkpoint (or the new one, once it is committed), resumes, and ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_ckpt.py")


def _train(ckpt, out, env_extra=None, **kw):
    args = [sys.executable, SCRIPT, "--ckpt", str(ckpt), "--out", str(out)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    r = _train(d / "ckpt", d / "final.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(d / "final.pt", weights_only=True)


def _assert_bitwise_equal(got, want):
    assert got["train"] == want["train"]
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), f"{k} differs after resume"


# (crash point, the step the next run resumes from): the save of step 4 dies there; step 2 is the last good one
# until the rename made step 4 committed. The first and last points a rank passes, and rank 0's last one before the
# manifest; what every point leaves on disk (after_index and after_manifest too) is checked by
# tests/cpp/checkpoint/commit_test.cc, and tests/python/recipes/test_fault_suite.py kills a whole job mid-save.
CASES = [("after_data", 2), ("before_manifest", 2), ("after_rename", 4)]


@pytest.mark.parametrize("point, resume_step", CASES)
def test_kill_during_save_then_resume(tmp_path, uninterrupted, point, resume_step):
    ckpt = tmp_path / "ckpt"
    crashed = _train(ckpt, tmp_path / "unused.pt", {"TESSERA_CHECKPOINT_CRASH_AT": f"{point}@4"})
    assert crashed.returncode != 0, "the crash point did not fire"
    assert "SIGKILL" in crashed.stderr or "signal 9" in crashed.stderr or "Killed" in crashed.stderr, crashed.stderr[-2000:]
    resumed = _train(ckpt, tmp_path / "final.pt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {resume_step}" in resumed.stdout, resumed.stdout
    _assert_bitwise_equal(torch.load(tmp_path / "final.pt", weights_only=True), uninterrupted)
    # The partial save left nothing that looks committed, and the leftovers were cleaned on restart.
    assert not any(n.startswith(".tmp-step-0000000004") for n in os.listdir(ckpt)) or point == "after_rename"


def test_external_kill_9_mid_run_then_resume(tmp_path, uninterrupted):
    # kill -9 of the whole job from outside, as soon as its first checkpoint is committed: wherever that lands
    # (training, staging, writing, committing, or even after the end), the next run ends where an uninterrupted
    # run ends.
    ckpt = tmp_path / "ckpt"
    args = [sys.executable, SCRIPT, "--ckpt", str(ckpt), "--out", str(tmp_path / "unused.pt")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and any(n.startswith("step-") for n in os.listdir(ckpt)):
            break
        time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)
    resumed = _train(ckpt, tmp_path / "final.pt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout, resumed.stdout
    _assert_bitwise_equal(torch.load(tmp_path / "final.pt", weights_only=True), uninterrupted)


def test_crash_point_knob_is_parsed_into_a_typed_value(monkeypatch):
    from tessera import knobs

    for raw, want in [("", None), ("after_data", knobs.CrashPoint("after_data")),
                      ("after_index@4", knobs.CrashPoint("after_index", 4)),
                      ("after_rename@12#1", knobs.CrashPoint("after_rename", 12, 1)),
                      ("after_data#0", knobs.CrashPoint("after_data", None, 0))]:
        monkeypatch.setenv("TESSERA_CHECKPOINT_CRASH_AT", raw)
        assert knobs.load().checkpoint_crash_point == want, raw
    for raw, needle in [("after_data@x", "step 'x'"), ("after_data@4#", "rank ''"), ("@4", "no crash point name")]:
        monkeypatch.setenv("TESSERA_CHECKPOINT_CRASH_AT", raw)
        with pytest.raises(ValueError, match=f"TESSERA_CHECKPOINT_CRASH_AT={raw!r}.*{needle}"):
            knobs.load()
