"""Step time of the C++ trainer (examples/cpp/llama_trainer, tessera's C++ API) vs the same training on tessera's
Python path (examples/cpp/llama_trainer/python_trainer.py: load_hf + tessera.shard + tessera.optim.AdamW): what
the Python hooks, the Python optimizer loop and the interpreter cost per step. Both run as 2-rank torchrun jobs on
the same model, the same token file and the same settings, one after the other, --repeats times each; the result
is the median over repeats of each run's mean step time (steps 2..N; the first step records the forward order).
Both also print per-step losses; the benchmark checks they agree within 1e-5 (else the comparison is void).

    python benchmarks/cpp_trainer.py [--model tiny|smollm2] [--steps 12] [--batch 2] [--seq 128] [--repeats 3]
        [--out benchmarks/results/cpp_trainer_cpu2rank_<machine>_<yyyymm>.md]

Needs scripts/build_cpp_trainer.sh first. smollm2 fetches SmolLM2-135M-Instruct (tessera.models.fetch).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python" / "cpp"))

from trainer_runs import CPP_TRAINER, make_hf_dir, make_tokens, run  # noqa: E402

_TIME = re.compile(r"^mean step time (\S+) s", re.M)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args()
    if not CPP_TRAINER.exists():
        sys.exit(f"{CPP_TRAINER} is missing: run scripts/build_cpp_trainer.sh first")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if a.model == "smollm2":
            from tessera.models.fetch import fetch

            hf, vocab = fetch("smollm2-135m-instruct"), 49152
        else:
            hf, vocab = make_hf_dir(d / "hf"), 250
        tokens = make_tokens(d / "tokens.bin", n=a.steps * 2 * a.batch * (a.seq + 1), vocab=vocab)
        args = dict(hf_dir=hf, tokens=tokens, steps=a.steps, batch=a.batch, seq=a.seq, lr=1e-4)
        times = {"cpp": [], "py": []}
        worst = 0.0
        for r in range(a.repeats):
            got = {}
            for kind in ("cpp", "py"):
                losses, out = run(kind, args, timeout=3600)
                times[kind].append(float(_TIME.search(out).group(1)))
                got[kind] = losses
                print(f"repeat {r + 1} {kind}: mean step time {times[kind][-1]:.4f} s", flush=True)
            worst = max(worst, max(abs(got["cpp"][s] - got["py"][s]) for s in got["cpp"]))
    assert worst <= 1e-5, f"the C++ and Python losses differ by {worst}: the runs are not the same training"
    cpp, py = statistics.median(times["cpp"]), statistics.median(times["py"])
    tokens_per_step = 2 * a.batch * a.seq
    lines = [
        f"# C++ trainer vs Python path: step time ({a.model}, 2 CPU ranks)",
        "",
        f"{datetime.date.today():%Y-%m-%d}, {platform.node()}, {os.cpu_count()} CPUs, gloo; "
        f"`python benchmarks/cpp_trainer.py --model {a.model} --steps {a.steps} --batch {a.batch} --seq {a.seq} "
        f"--repeats {a.repeats}`. Median over {a.repeats} runs of each run's mean step time (steps 2..{a.steps}); "
        f"{tokens_per_step} tokens per step; per-step losses agree within {worst:.1e}.",
        "",
        "| trainer | step time (s) | tokens/s | runs (s) |",
        "|---|---|---|---|",
        f"| C++ (tessera C++ API) | {cpp:.4f} | {tokens_per_step / cpp:.0f} | "
        + ", ".join(f"{t:.4f}" for t in times["cpp"]) + " |",
        f"| Python (tessera.shard + tessera.optim.AdamW) | {py:.4f} | {tokens_per_step / py:.0f} | "
        + ", ".join(f"{t:.4f}" for t in times["py"]) + " |",
        "",
        f"Python / C++ step time: **{py / cpp:.3f}x** (what the Python hooks and loop cost: "
        f"{(py - cpp) * 1e3:+.1f} ms per step).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
