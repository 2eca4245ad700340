"""nccl-tests' bandwidth formulas, the straggler rule and the report's verdict, against hand computations."""

from __future__ import annotations

import pytest

from tessera.doctor import algbw_gbps, busbw_gbps, stragglers
from tessera.doctor.report import build_report, table
from tessera.errors import InvalidArgumentError


def test_busbw_by_hand():
    # 1e9 bytes in 0.5 s: algbw 2 GB/s. n = 4: all_reduce 2 * 2*3/4 = 3.0; all_gather, reduce_scatter 2 * 3/4 = 1.5.
    assert algbw_gbps(10**9, 0.5) == pytest.approx(2.0)
    assert busbw_gbps("all_reduce", 10**9, 0.5, 4) == pytest.approx(3.0)
    assert busbw_gbps("all_gather", 10**9, 0.5, 4) == pytest.approx(1.5)
    assert busbw_gbps("reduce_scatter", 10**9, 0.5, 4) == pytest.approx(1.5)
    # 8 MiB = 8388608 bytes in 4 ms over 8 ranks: algbw 2.097152 GB/s; x 14/8 = 3.670016; x 7/8 = 1.835008.
    assert busbw_gbps("all_reduce", 8 << 20, 0.004, 8) == pytest.approx(3.670016)
    assert busbw_gbps("all_gather", 8 << 20, 0.004, 8) == pytest.approx(1.835008)
    # One rank moves nothing over a link.
    assert busbw_gbps("all_reduce", 10**9, 1.0, 1) == 0.0


def test_busbw_rejects_bad_input():
    with pytest.raises(InvalidArgumentError, match="broadcast"):
        busbw_gbps("broadcast", 1, 1.0, 2)
    with pytest.raises(InvalidArgumentError, match="time"):
        algbw_gbps(1, 0.0)


def test_stragglers_rule():
    # Median 100; threshold (1 - 0.25) * 100 = 75: 70 is flagged, 75 (not more than 25% below) and 80 are not.
    assert stragglers({0: 100.0, 1: 100.0, 2: 70.0}, 0.25) == (100.0, {2})
    assert stragglers({0: 100.0, 1: 100.0, 2: 75.0}, 0.25) == (100.0, set())
    # Two ranks: the median is their mean, 75; 50 < 56.25 is flagged.
    assert stragglers({0: 100.0, 1: 50.0}, 0.25) == (75.0, {1})
    with pytest.raises(InvalidArgumentError, match="margin"):
        stragglers({0: 1.0}, 1.0)


def _rank(rank, gemm, *, ckpt_error=None):
    results = [{"check": "gemm", "status": "pass", "figure": gemm, "unit": "TFLOP/s", "compare": True,
                "error": None, "details": {}},
               {"check": "h2d", "status": "n/a", "figure": None, "unit": None, "compare": False, "error": None,
                "details": {}}]
    if ckpt_error:
        results.append({"check": "checkpoint_write", "status": "fail", "figure": None, "unit": None,
                        "compare": True, "error": ckpt_error, "details": {}})
    return {"rank": rank, "host": f"h{rank}", "device_name": "cpu", "results": results}


def test_report_verdict():
    ok = build_report([_rank(1, 10.0), _rank(0, 9.0)], device="cpu", margin=0.25, quick=True)
    assert (ok["exit_status"], ok["problems"]) == (0, [])
    assert [(r["rank"], r["check"], r["median"]) for r in ok["checks"]] == [
        (0, "gemm", 9.5), (1, "gemm", 9.5), (0, "h2d", None), (1, "h2d", None)]
    slow = build_report([_rank(0, 10.0), _rank(1, 10.0), _rank(2, 7.0)], device="cpu", margin=0.25, quick=True)
    assert slow["exit_status"] == 1
    assert [r["rank"] for r in slow["checks"] if r["flagged"]] == [2]
    assert slow["problems"] == ["rank 2: gemm: 7 TFLOP/s is more than 25% below the median of the ranks, "
                                "10 TFLOP/s (expected >= 7.5)"]
    assert "SLOW" in table(slow).splitlines()[3]
    # A figure reported but not compared (a collective's: the group's speed) is never flagged; its median is shown.
    group = [_rank(r, 10.0) for r in range(3)]
    for r, busbw in enumerate((1.0, 1.0, 0.1)):
        group[r]["results"].append({"check": "all_reduce 1MiB", "status": "pass", "figure": busbw,
                                    "unit": "GB/s busbw", "compare": False, "error": None, "details": {}})
    rep = build_report(group, device="cpu", margin=0.25, quick=True)
    assert rep["exit_status"] == 0
    assert [(r["median"], r["flagged"]) for r in rep["checks"] if r["check"] == "all_reduce 1MiB"] == [(1.0, False)] * 3
    failed = build_report([_rank(0, 10.0), _rank(1, 10.0, ckpt_error="rank 1: checkpoint_write: /x not writable")],
                          device="cpu", margin=0.25, quick=True)
    assert failed["exit_status"] == 1 and failed["problems"] == ["rank 1: checkpoint_write: /x not writable"]
