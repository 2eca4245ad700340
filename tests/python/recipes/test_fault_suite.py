"""The fault suite (issue 9): one job under `tessera run --nproc 2 --max-restarts K` meets a different real fault in
each attempt (tessera.recipes.faults): SIGKILL of a rank in forward, in backward, after the optimizer step, at a
point of a save, in the middle of a load; a corrupted newest checkpoint; a full disk (RLIMIT_FSIZE) during a save;
a rank stopped with SIGSTOP. Each time the job must carry on by itself and end bit-identical to an uninterrupted run
at the same world size, with every committed checkpoint intact. The long variant (20+ random kills, timings) is
benchmarks/fault_suite.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from same_run import assert_same_run

from tessera import _C

REPO = Path(__file__).resolve().parents[3]
STEPS, EVERY = 20, 2
COMMON = [str(REPO / "recipes" / "tiny_llama_demo.yaml"), "data.seq_len=32", "training.batch_size=2",
          "training.eval_every=0", "metrics.log_every=1", "checkpoint.export_hf=true", "metrics.prompt=",
          "data.source=synthetic", "model.lora.rank=4", "model.lora.dropout=0.1", f"training.steps={STEPS}",
          f"checkpoint.every={EVERY}", "checkpoint.keep_last=0",
          # a stopped rank is found by the collective deadline (heartbeats off here: this tests part 1)
          "resilience.collective_timeout_s=4", "resilience.heartbeat_timeout_s=0"]

# One fault per attempt; steps rise so that every attempt makes progress past its predecessor's checkpoint.
PLAN = [
    {"kind": "kill", "at": "forward", "step": 3, "rank": 1},
    {"kind": "kill", "at": "backward", "step": 5, "rank": 0},
    {"kind": "kill", "at": "optimizer", "step": 7, "rank": 1},
    {"kind": "kill", "at": "save", "point": "after_data", "step": 8, "rank": 0},
    {"kind": "kill", "at": "load", "step": 0, "rank": 1},
    {"kind": "corrupt", "at": "forward", "step": 11, "rank": 0},
    {"kind": "full_disk", "step": 13, "rank": 1, "bytes": 4096},
    {"kind": "stop", "at": "forward", "step": 17, "rank": 1},
]


def _run(out: Path, *extra, env=None, nproc=None, restarts=None):
    launch = ["--nproc", str(nproc), "--max-restarts", str(restarts)] if nproc else []
    return subprocess.run([sys.executable, "-m", "tessera", "run", *COMMON, f"output_dir={out}", *extra, *launch],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_every_fault_kind_once_ends_bit_identical(tmp_path):
    ref = _run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"attempt": i, **f} for i, f in enumerate(PLAN)]))
    out = tmp_path / "faulty"
    res = _run(out, env={"TESSERA_FAULT_PLAN": str(plan)}, nproc=2, restarts=len(PLAN) + 1)
    log = [json.loads(line) for line in Path(f"{plan}.fired.jsonl").read_text().splitlines()]
    fired = [e for e in log if "kind" in e]  # the others mark each attempt's first step (for the benchmark)
    assert res.returncode == 0, (fired, res.stderr[-4000:])
    # Every planned fault fired, in its own attempt (a fault that never fired would make this test vacuous).
    assert sorted((f["attempt"], f["kind"], f["at"]) for f in fired) == sorted(
        (i, f["kind"], f.get("at", "step")) for i, f in enumerate(PLAN)), fired
    assert res.stdout.count("resumed from checkpoint step") >= len(PLAN) - 1, res.stdout[-3000:]
    # The corrupted checkpoint was skipped for an older one, with a warning naming it.
    assert "skipping step" in res.stderr, res.stderr[-3000:]
    # The stopped rank was reported at the 4 s collective deadline (tessera's, or gloo's own of the same length,
    # whichever fired first), by the other rank, naming it, the step, the collective and the unit.
    reports = [line for line in res.stderr.splitlines() if "exit status 75" in line and "step 17" in line]
    assert reports and all(("did not finish within 4s" in r or "Timed out waiting 4000ms" in r) and
                           "on rank 0 of 2" in r and "all_gather" in r and "unit '" in r for r in reports), \
        res.stderr[-3000:]

    assert_same_run(tmp_path / "ref", out, fired)
    # No checkpoint lost: every save step is committed and verifies (checksums of every byte), the corrupted one
    # included, because the restarted job saved that step again.
    ckpts = out / "checkpoints"
    assert list(_C.list_committed_steps(str(ckpts))) == list(range(STEPS, 0, -EVERY)) or sorted(
        _C.list_committed_steps(str(ckpts))) == list(range(EVERY, STEPS + 1, EVERY))
    for step in _C.list_committed_steps(str(ckpts)):
        _C.CheckpointReader(str(ckpts), step).verify_all()
