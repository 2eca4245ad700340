"""The fault suite, long variant (issue 9): a `tessera run --nproc 2 --max-restarts K` job meets a real fault every
N steps, each one drawn at random: SIGKILL of a random rank in forward, in backward, after the optimizer step, at a
random point of a save or in the middle of a load (20 or more of these over the runs), a rank stopped with SIGSTOP,
a full disk (RLIMIT_FSIZE) during a save, a corrupted newest checkpoint. Every run must end by itself, bit-identical
to an uninterrupted run (the HF export and the adapter, every tensor) with every committed checkpoint verifying.

    python benchmarks/fault_suite.py [--steps 48] [--every 6 12] [--seed 0] [--out benchmarks/results/...md]

Measured, per fault (tessera.recipes.faults logs the moment each fires; torch's elastic agent logs when it tears the
group down; metrics.jsonl has each step's wall-clock end):
- detection latency: fault -> the agent logging the failed worker group ("failed (exitcode: ...)").
- restart time: that -> the first training step of the next attempt finished (process start, init, checkpoint load
  and one step; rank 0 logs it).
- effective training time: steps x the uninterrupted run's mean step time / the faulty run's wall time (the
  uninterrupted run's own ratio is given too: start-up and the final export are not training either).
There is no peer run: torch ships the elastic agent (used here) but no training loop that resumes by itself to
compare against on the same input. Timings are from the 2-core dev VM (CPU ranks, gloo), not a GPU cluster.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOAD_AT_START = os.getloadavg()[0]
from tessera.recipes.faults import RANK0_SAVE_POINTS, SAVE_POINTS  # noqa: E402
# torch's elastic agent logs a failed worker group as "E1130 01:12:03.123000 PID .../api.py:986] failed (exitcode:".
AGENT_DETECTED = re.compile(r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+) .*\] failed \(exitcode:", re.M)


def recipe(steps: int, every_ckpt: int) -> list[str]:
    return [str(REPO / "recipes" / "tiny_llama_demo.yaml"), "data.seq_len=32", "training.batch_size=2",
            "training.eval_every=0", "metrics.log_every=1", "checkpoint.export_hf=true", "metrics.prompt=",
            "data.source=synthetic", "model.lora.rank=4", "model.lora.dropout=0.1", f"training.steps={steps}",
            f"checkpoint.every={every_ckpt}", "checkpoint.keep_last=0", "resilience.collective_timeout_s=4",
            "resilience.heartbeat_interval_s=0.5", "resilience.heartbeat_timeout_s=3", "metrics.progress=false"]


def make_plan(rng: random.Random, steps: int, every: int) -> list[dict]:
    """One fault per attempt at steps every, 2*every, ...; mostly kills at random moments, with one stop, one full
    disk and one corrupted checkpoint per run."""
    at_steps = list(range(every, steps, every))
    specials = rng.sample(range(1, len(at_steps)), k=min(3, len(at_steps) - 1))  # not attempt 0: see "load" below
    plan = []
    for i, step in enumerate(at_steps):
        rank = rng.randrange(2)
        if i == specials[0]:
            f = {"kind": "stop", "at": rng.choice(["forward", "backward", "optimizer"])}
        elif len(specials) > 1 and i == specials[1]:
            f = {"kind": "full_disk", "bytes": 4096}
        elif len(specials) > 2 and i == specials[2]:
            f = {"kind": "corrupt", "at": rng.choice(["forward", "backward", "optimizer"])}
        else:
            # A load needs a checkpoint at the attempt's start: attempts 0 and 1 may have none yet.
            at = rng.choice(["forward", "backward", "optimizer", "save"] + (["load"] if i >= 2 else []))
            f = {"kind": "kill", "at": at}
            if at == "save":
                f["point"] = rng.choice(SAVE_POINTS)
                if f["point"] in RANK0_SAVE_POINTS:
                    rank = 0  # only rank 0 commits
        plan.append({"attempt": i, "rank": rank, "step": step, **f})
    return plan


def run(args: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "tessera", "run", *args], capture_output=True, text=True,
                         timeout=3600, env={**os.environ, **(env or {})})
    return res, time.time() - t0


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]


def agent_detections(stderr: str) -> list[float]:
    """Epoch seconds of the agent's "failed (exitcode" log lines (torch's glog-style prefix, local time, no year)."""
    year = datetime.datetime.now().year
    times = []
    for mmdd, hms in AGENT_DETECTED.findall(stderr):
        t = datetime.datetime.strptime(f"{year}{mmdd} {hms[:15]}", "%Y%m%d %H:%M:%S.%f")
        times.append(t.timestamp())
    return sorted(set(round(t, 1) for t in times))


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    for sub in ("hf/model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(a / sub), load_file(b / sub)
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


def checkpoints_verify(root: Path) -> tuple[int, list[str]]:
    from tessera import _C

    bad = []
    steps = list(_C.list_committed_steps(str(root)))
    for step in steps:
        try:
            _C.CheckpointReader(str(root), step).verify_all()
        except Exception as e:  # noqa: BLE001 - reported
            bad.append(f"step {step}: {e}")
    return len(steps), bad


def one_run(work: Path, steps: int, every: int, ckpt_every: int, seed: int, ref: Path, ref_step_s: float) -> dict:
    plan = make_plan(random.Random(seed), steps, every)
    plan_file = work / f"plan_every{every}.json"
    plan_file.write_text(json.dumps(plan, indent=1))
    out = work / f"faulty_every{every}"
    res, wall = run([*recipe(steps, ckpt_every), f"output_dir={out}", "--nproc", "2", "--max-restarts",
                     str(len(plan) + 2)], env={"TESSERA_FAULT_PLAN": str(plan_file)})
    log = [json.loads(line) for line in Path(f"{plan_file}.fired.jsonl").read_text().splitlines()]
    fired = [e for e in log if "kind" in e]
    first_step = {e["attempt"]: e["time"] for e in log if e.get("event") == "first_step"}
    detections = agent_detections(res.stderr)
    rows = []
    for f in fired:
        detect = next((t for t in detections if t >= f["time"] - 0.05), None)
        resumed = first_step.get(f["attempt"] + 1)
        rows.append({**f, "detect_s": None if detect is None else max(0.0, detect - f["time"]),
                     "restart_s": None if resumed is None or detect is None else resumed - detect})
    n_ckpt, bad = checkpoints_verify(out / "checkpoints")
    return {"every": every, "faults": rows, "planned": len(plan), "returncode": res.returncode, "wall_s": wall,
            "effective": steps * ref_step_s / wall, "identical": res.returncode == 0 and same_weights(ref, out),
            "checkpoints": n_ckpt, "bad_checkpoints": bad, "stderr_tail": res.stderr[-1500:] if res.returncode else ""}


def report(results: list[dict], ref_wall: float, ref_step_s: float, steps: int, ckpt_every: int) -> str:
    lines = [f"# Fault suite: tessera run, 2 CPU ranks (gloo), {datetime.date.today():%Y-%m}", "",
             f"Machine: {platform.node()} ({os.cpu_count()} cores, load average {LOAD_AT_START:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()}. Job: the tiny "
             f"demo recipe with LoRA (rank 4, dropout 0.1), {steps} steps, a checkpoint every {ckpt_every} steps; "
             "collective timeout after the first step 4 s, heartbeat every 0.5 s, heartbeat timeout 3 s.",
             f"Uninterrupted run: {ref_wall:.1f} s wall, {ref_step_s * 1e3:.0f} ms per step, effective training time "
             f"{steps * ref_step_s / ref_wall:.0%}. A restart time of '-': the next attempt met its own fault before it "
             "finished a step.", ""]
    for r in results:
        det = [f["detect_s"] for f in r["faults"] if f["detect_s"] is not None]
        rst = [f["restart_s"] for f in r["faults"] if f["restart_s"] is not None]
        lines += [f"## A fault every {r['every']} steps: {len(r['faults'])} of {r['planned']} fired", "",
                  f"- finished by itself: {'yes' if r['returncode'] == 0 else 'NO (exit %d)' % r['returncode']}; "
                  f"final weights bit-identical to the uninterrupted run: {'yes' if r['identical'] else 'NO'}; "
                  f"committed checkpoints verifying: {r['checkpoints'] - len(r['bad_checkpoints'])} of "
                  f"{r['checkpoints']}",
                  f"- wall {r['wall_s']:.1f} s; effective training time {r['effective']:.0%}",
                  f"- detection latency: median {statistics.median(det):.2f} s, max {max(det):.2f} s" if det else
                  "- detection latency: not measured",
                  f"- restart time: median {statistics.median(rst):.2f} s, max {max(rst):.2f} s" if rst else
                  "- restart time: not measured", "",
                  "| attempt | rank | fault | step | detection (s) | restart (s) |", "|---|---|---|---|---|---|"]
        for f in r["faults"]:
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"| {f['attempt']} | {f['rank']} | {f['kind']} at {f['at']} | {f['step']} | "
                         f"{fmt(f['detect_s'])} | {fmt(f['restart_s'])} |")
        if r["bad_checkpoints"] or r["stderr_tail"]:
            lines += ["", "```", *r["bad_checkpoints"], r["stderr_tail"], "```"]
        lines.append("")
    kinds = {}
    for r in results:
        for f in r["faults"]:
            kinds.setdefault(f"{f['kind']} at {f['at']}", []).append(f["detect_s"])
    lines += ["## Detection latency by fault", "", "| fault | n | median (s) | max (s) |", "|---|---|---|---|"]
    for k, v in sorted(kinds.items()):
        v = [x for x in v if x is not None]
        if v:
            lines.append(f"| {k} | {len(v)} | {statistics.median(v):.2f} | {max(v):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--every", type=int, nargs="+", default=[4, 8], help="steps between faults, one run each")
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera_faults_") as d:
        work = Path(d)
        ref = work / "ref"
        res, ref_wall = run([*recipe(a.steps, a.checkpoint_every), f"output_dir={ref}"])
        if res.returncode != 0:
            sys.exit(f"the uninterrupted run failed:\n{res.stderr[-3000:]}")
        t = [m["time"] for m in metrics(ref) if "time" in m]
        ref_step_s = (t[-1] - t[0]) / (len(t) - 1)
        results = []
        for i, every in enumerate(a.every):
            r = one_run(work, a.steps, every, a.checkpoint_every, a.seed + i, ref, ref_step_s)
            print(f"every {every}: {len(r['faults'])} faults, exit {r['returncode']}, identical {r['identical']}, "
                  f"wall {r['wall_s']:.1f} s", flush=True)
            results.append(r)
    text = report(results, ref_wall, ref_step_s, a.steps, a.checkpoint_every)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    if not all(r["identical"] and not r["bad_checkpoints"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
