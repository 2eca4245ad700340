"""From every rank's results to the verdict: medians and stragglers per check, the table, the JSON report and the
exit status (0: every check passed and no rank is flagged; 1: a check failed or a rank is flagged)."""

from __future__ import annotations

import datetime
import json
import os

from tessera.doctor.bandwidth import stragglers


def build_report(ranks: list[dict], *, device: str, margin: float, quick: bool) -> dict:
    """`ranks`: one dict per rank, {"rank", "host", "device_name", "results": [Result.to_json(), ...]}. Returns the
    report (JSON-ready): every figure with its unit, the median of the ranks that passed, the flag (only for figures
    marked `compare`), the problems found and the exit status."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    order: list[str] = []
    by_check: dict[str, dict[int, dict]] = {}
    for r in ranks:
        for res in r["results"]:
            if res["check"] not in by_check:
                order.append(res["check"])
            by_check.setdefault(res["check"], {})[r["rank"]] = res
    rows, problems = [], []
    for check in order:
        per_rank = by_check[check]
        figures = {rank: res["figure"] for rank, res in per_rank.items()
                   if res["status"] == "pass" and res["figure"] is not None}
        median, flagged = stragglers(figures, margin) if figures else (None, set())
        if not all(per_rank[rank]["compare"] for rank in figures):  # reported, not judged (see Result.compare)
            flagged = set()
        for rank, res in sorted(per_rank.items()):
            row = dict(res, rank=rank, median=median, flagged=rank in flagged)
            rows.append(row)
            if res["status"] == "fail":
                problems.append(res["error"])
            elif row["flagged"]:
                problems.append(f"rank {rank}: {check}: {res['figure']:.4g} {res['unit']} is more than "
                                f"{margin:.0%} below the median of the ranks, {median:.4g} {res['unit']} "
                                f"(expected >= {(1 - margin) * median:.4g})")
    status = 1 if problems else 0
    return {
        "tool": "tessera doctor",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "world_size": len(ranks),
        "margin": margin,
        "quick": quick,
        "passed": status == 0,
        "exit_status": status,
        "ranks": [{k: r[k] for k in ("rank", "host", "device_name")} for r in ranks],
        "checks": rows,
        "problems": problems,
    }


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def table(report: dict) -> str:
    """One row per rank x check: figure, unit, the median of the ranks, and the result (ok, n/a, SLOW, FAIL)."""
    hosts = {r["rank"]: r["host"] for r in report["ranks"]}
    head = ("rank", "host", "check", "figure", "unit", "median", "result")
    lines = [head]
    for row in report["checks"]:
        result = {"pass": "ok", "n/a": "n/a", "fail": "FAIL"}[row["status"]]
        if row["flagged"]:
            result = "SLOW"
        lines.append((str(row["rank"]), hosts.get(row["rank"], "?"), row["check"], _fmt(row["figure"]),
                      row["unit"] or "", _fmt(row["median"]), result))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    verdict = "PASS" if report["passed"] else f"FAIL ({len(report['problems'])} problem(s))"
    out.append(f"tessera doctor: {report['world_size']} rank(s) on {report['device']}: {verdict}")
    out.extend(f"  {p}" for p in report["problems"])
    return "\n".join(out)


def write_json(report: dict, path: str) -> None:
    """Writes the report to `path` (atomically: a temporary file renamed over it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
