"""`tessera doctor` on real CPU ranks over gloo (spawned by the doctor itself), through tessera.cli.main and a
subprocess: the checks pass and the JSON holds every figure; an unwritable checkpoint directory and a slowed rank
(TESSERA_DOCTOR_SLOW_RANK) fail the run with exit status 1; bad arguments give 2."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from tessera import cli
from tessera.doctor import busbw_gbps, checks
from tessera.doctor.run import DoctorOptions, run_doctor

MiB = 1 << 20


def _by(report):
    return {(row["rank"], row["check"]): row for row in report["checks"]}


def _check_report(report, world):
    assert (report["world_size"], report["device"], report["quick"]) == (world, "cpu", True)
    assert [r["rank"] for r in report["ranks"]] == list(range(world))
    assert all(r["host"] and r["device_name"] for r in report["ranks"])
    rows = _by(report)
    sizes = (256 * 1024, MiB)
    names = ["gemm", "memory", "h2d", "d2h", "checkpoint_write", "nvml"] + [
        f"{c} {s / MiB:g}MiB" for s in sizes for c in ("all_reduce", "all_gather", "reduce_scatter")]
    assert set(rows) == {(rank, name) for rank in range(world) for name in names}
    for rank in range(world):
        assert rows[rank, "gemm"]["unit"] == "TFLOP/s" and rows[rank, "gemm"]["figure"] > 0
        assert rows[rank, "checkpoint_write"]["unit"] == "GB/s"
        assert [p["mismatches"] for p in rows[rank, "memory"]["details"]["patterns"]] == [0] * 5
        for na in ("h2d", "d2h", "nvml"):
            assert rows[rank, na]["status"] == "n/a" and rows[rank, na]["figure"] is None
        for size in sizes:
            for c in ("all_reduce", "all_gather", "reduce_scatter"):
                row = rows[rank, f"{c} {size / MiB:g}MiB"]
                d = row["details"]
                # The full buffer, rounded down to whole fp32 elements per rank (by hand: 1 MiB on 3 ranks is
                # 262143 elements = 1048572 bytes).
                assert d["bytes"] == size // 4 // world * world * 4
                assert d["algbw_gbps"] == pytest.approx(d["bytes"] / d["seconds"] / 1e9)
                assert row["figure"] == pytest.approx(busbw_gbps(c, d["bytes"], d["seconds"], world))
                assert row["unit"] == "GB/s busbw"
    for name in names:  # the median of the figures, by hand; only the ranks' own figures are judged
        figures = [rows[r, name]["figure"] for r in range(world)]
        if figures[0] is not None:
            assert rows[0, name]["median"] == pytest.approx(statistics.median(figures))
        assert rows[0, name]["compare"] == (name in ("gemm", "checkpoint_write"))


def test_two_ranks_pass_through_the_cli(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    # --margin 0.9 in the "healthy" runs: on a shared 2-core VM one rank's disk write was 30% below the other's (seen
    # in a full-suite run); the flagging rule itself is tested with a rank slowed 4x (test_slowed_rank_is_flagged).
    assert cli.main(["doctor", "--quick", "--margin", "0.9", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and report["exit_status"] == 0 and report["problems"] == []
    _check_report(report, 2)
    table = capsys.readouterr().out
    assert "tessera doctor: 2 rank(s) on cpu: PASS" in table
    assert sum(line.split()[2:3] == ["gemm"] for line in table.splitlines()) == 2  # one row per rank


def test_three_ranks_pass(tmp_path):
    out = tmp_path / "doctor.json"
    assert run_doctor(DoctorOptions(nproc=3, quick=True, json_path=str(out), checkpoint_dir=str(tmp_path),
                                    margin=0.9)) == 0
    report = json.loads(out.read_text())
    _check_report(report, 3)
    assert all(row["details"]["dir"] == str(tmp_path) for row in report["checks"]
               if row["check"] == "checkpoint_write")
    assert sorted(os.listdir(tmp_path)) == ["doctor.json"]  # the test files were removed


def test_unwritable_checkpoint_dir_fails(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = blocker / "ckpt"  # unwritable even for root (a read-only directory is not, for root)
    out = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--quick", "--json", str(out), "--checkpoint-dir", str(bad)]) == 1
    report = json.loads(out.read_text())
    rows = _by(report)
    for rank in range(2):
        row = rows[rank, "checkpoint_write"]
        assert row["status"] == "fail"
        assert row["error"].startswith(f"rank {rank}: checkpoint_write: OSError: checkpoint directory {bad} is not "
                                       "writable")
        assert rows[rank, "gemm"]["status"] == "pass"  # the other checks still ran
    assert f"checkpoint directory {bad} is not writable" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_checkpoint_dir_names_it(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(OSError, match=f"checkpoint directory {ro} is not writable"):
        checks.checkpoint_dir(str(ro), 0, quick=True)


def test_slowed_rank_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_DOCTOR_SLOW_RANK", "1")
    out = tmp_path / "doctor.json"
    assert run_doctor(DoctorOptions(nproc=2, quick=True, json_path=str(out))) == 1
    rows = _by(json.loads(out.read_text()))
    slow, fast = rows[1, "gemm"], rows[0, "gemm"]
    assert (slow["details"]["slowed"], fast["details"]["slowed"]) == (True, False)
    assert (slow["flagged"], fast["flagged"]) == (True, False)
    # 3x the compute time slept: a quarter of the healthy rank's figure, well under 75% of the median.
    assert slow["figure"] < 0.75 * slow["median"]
    assert slow["median"] == pytest.approx((slow["figure"] + fast["figure"]) / 2)
    assert any(p.startswith("rank 1: gemm: ") for p in json.loads(out.read_text())["problems"])


def test_bad_arguments_exit_2(capsys):
    assert cli.main(["doctor", "--margin", "1.5"]) == 2
    assert "--margin 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["doctor", "--device", "tpu"])
    assert e.value.code == 2
    proc = subprocess.run([sys.executable, "-m", "tessera", "doctor", "--nproc", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--nproc 0: expected at least 1 rank" in proc.stderr


def test_under_torchrun(tmp_path):
    """Under torchrun each process is one rank; rank 0 alone prints the table and writes the JSON; all exit 0."""
    out = tmp_path / "doctor.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "tessera", "doctor", "--quick", "--margin", "0.9", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("tessera doctor: 2 rank(s) on cpu: PASS") == 1
    _check_report(json.loads(out.read_text()), 2)
