"""Straggler detection (tessera.resilience.straggler): the median arithmetic by hand; real gloo ranks training a
sharded model where one rank is slowed by TESSERA_SLOW_RANK (its compute is flagged, the fast rank's wait for it is
not counted as compute) and a healthy run (nothing flagged); and `tessera run` logging it in metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import tessera
from conftest import run_ranks
from tessera.resilience.straggler import StragglerMonitor, find_stragglers

REPO = Path(__file__).resolve().parents[3]
SLEEP_S = 0.3


def test_stragglers_are_those_above_factor_times_the_median_rank():
    median, found = find_stragglers([0.20, 0.21, 0.52, 0.19], 1.5)
    assert median == 0.20  # median_low of 0.19, 0.20, 0.21, 0.52
    assert [(s["rank"], round(s["ratio"], 6)) for s in found] == [(2, 2.6)]  # 0.52 / 0.20; 0.21 / 0.20 = 1.05
    assert find_stragglers([0.5, 0.2], 1.5)[1][0]["rank"] == 0  # two ranks: compared with the faster one
    assert find_stragglers([0.2, 0.2, 0.2], 1.5) == (0.2, [])


def _train(rank, world, out_dir, window, factor):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(3)], nn.Linear(64, 8))
    for block in model[:3]:
        tessera.shard(block)
    tessera.shard(model)
    opt = tessera.optim.AdamW(model.parameters(), lr=1e-3)
    mon = StragglerMonitor(rank=rank, world=world, window=window, factor=factor, device=torch.device("cpu"),
                           say=lambda msg: said.append(msg))
    records, said = [], []
    for step in range(1, 2 * window + 1):
        mon.begin_step(step)
        model(torch.randn(16, 64)).square().sum().backward()
        tessera.clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad()
        if (r := mon.end_step(step)) is not None:
            records.append({"step": step, **r})
    if rank == 0:
        (Path(out_dir) / "records.json").write_text(json.dumps(records))
        (Path(out_dir) / "said.txt").write_text("\n".join(said))  # what rank 0 logged (not via the child's stdout)


# Factor 3 rather than the default 1.5: these steps compute for milliseconds on 2 cores shared with other jobs, where
# scheduling noise alone can be 1.5x; the slowed rank is 0.3 s slower per step, far above either.
@pytest.mark.parametrize("slow", [True, False], ids=["slow_rank", "healthy"])
def test_slowed_rank_is_flagged_and_a_healthy_run_flags_none(tmp_path, monkeypatch, slow):
    if slow:
        monkeypatch.setenv("TESSERA_SLOW_RANK", f"1:{SLEEP_S}")
    else:
        monkeypatch.delenv("TESSERA_SLOW_RANK", raising=False)
    run_ranks(2, _train, str(tmp_path), 3, 3.0)
    records = json.loads((tmp_path / "records.json").read_text())
    assert [r["step"] for r in records] == [3, 6]
    out = (tmp_path / "said.txt").read_text()
    for r in records:
        fast, slowed = r["rank_compute_s"]
        if slow:
            # The slowed rank's compute includes its sleep; the fast rank waited about as long in the all-gathers,
            # which must not count as its compute (else it would look as slow and nothing would be flagged).
            assert slowed >= SLEEP_S and fast < SLEEP_S / 3, r
            assert [s["rank"] for s in r["stragglers"]] == [1], r
        else:
            assert r["stragglers"] == [] and max(fast, slowed) < SLEEP_S / 3, r
    if slow:
        assert "straggler: rank 1 compute" in out and "over steps 1-3" in out and "over steps 4-6" in out, out
    else:
        assert "straggler:" not in out, out


def test_tessera_run_logs_a_slowed_rank_in_metrics(tmp_path):
    out = tmp_path / "run"
    args = [str(REPO / "recipes" / "tiny_llama_demo.yaml"), "data.seq_len=32", "training.batch_size=2",
            "training.eval_every=0", "training.eval_batches=1", "metrics.log_every=1", "metrics.prompt=",
            "metrics.tensorboard=false", "training.steps=2", "resilience.straggler_window=2",
            "resilience.heartbeat_interval_s=0.5", "resilience.heartbeat_timeout_s=5", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "tessera", "run", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TESSERA_SLOW_RANK": "1:1.0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "straggler: rank 1 compute" in proc.stdout and "over steps 1-2" in proc.stdout, proc.stdout
    assert "heartbeat" not in proc.stderr, proc.stderr  # heartbeats ran (timeout 5 s) through steps of over 1 s and nobody was lost
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    flagged = {x["step"]: [s["rank"] for s in x["stragglers"]] for x in lines if "stragglers" in x}
    assert flagged == {2: [1]}, flagged
