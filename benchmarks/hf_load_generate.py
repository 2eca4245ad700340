"""Loading an HF checkpoint and greedy generation: tessera vs transformers on the same directory, same run (CPU).

    python benchmarks/hf_load_generate.py [MODEL_DIR] [--repeats 3] [--new-tokens 64] [--out results/...md]

MODEL_DIR defaults to `tessera fetch smollm2-135m-instruct`. Reported:
- load: wall time and peak host memory of `tessera.models.load_hf(dir, dtype=float32)` vs transformers'
  `AutoModelForCausalLM.from_pretrained(dir, dtype=float32)`, each in a fresh process (the peak is the growth of
  VmHWM, the process's peak resident set, over its value after the imports; memory-mapped weight pages count
  once touched, so it is also given after reading every weight once);
  median of --repeats;
- generation: greedy tokens/s (new tokens / wall time, prefill included) of tessera's `generate_tokens` vs
  transformers' `generate(do_sample=False)` for the same chat prompt, fp32, batch 1, with a KV cache in both;
  both must produce the same tokens. Median of --repeats, alternating the two.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_CHILD = r"""
import json, sys, time, torch
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
which, path = sys.argv[1], sys.argv[2]
if which == "tessera":
    import tessera.models as tm
else:
    from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
base = hwm()
t0 = time.perf_counter()
if which == "tessera":
    model = tm.load_hf(path, dtype=torch.float32)
else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
dt = time.perf_counter() - t0
peak_loaded = hwm() - base
with torch.no_grad():  # read every weight once: memory-mapped pages are only resident once touched
    sum(float(p.sum()) for p in model.parameters())
print(json.dumps({"s": dt, "peak_bytes": peak_loaded, "peak_touched_bytes": hwm() - base,
                  "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def load_once(which: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, which, path], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def generation(path: str, repeats: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tessera.models as tm
    from tessera.models.generate import generate_tokens

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ours = tm.load_hf(path, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    times = {"tessera": [], "transformers": []}
    outs = {}
    for _ in range(repeats + 1):  # the first round warms up
        for which in ("tessera", "transformers"):
            t0 = time.perf_counter()
            with torch.inference_mode():
                if which == "tessera":
                    out = generate_tokens(ours, ids, max_new_tokens=new_tokens)
                else:
                    out = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          eos_token_id=None, pad_token_id=0)
            times[which].append(time.perf_counter() - t0)
            outs[which] = out
    same = outs["tessera"].tolist() == outs["transformers"].tolist()
    return {"prompt_tokens": ids.shape[1], "same_tokens": same,
            **{w: new_tokens / statistics.median(t[1:]) for w, t in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out")
    args = p.parse_args()
    path = args.model_dir
    if path is None:
        from tessera.models.fetch import fetch

        path = str(fetch("smollm2-135m-instruct"))
    loads = {w: [load_once(w, path) for _ in range(args.repeats)] for w in ("tessera", "transformers")}
    load = {w: {"s": statistics.median(r["s"] for r in rs), "peak_mb": statistics.median(r["peak_bytes"] for r in rs) / 1e6,
                "touched_mb": statistics.median(r["peak_touched_bytes"] for r in rs) / 1e6,
                "param_mb": rs[0]["param_bytes"] / 1e6} for w, rs in loads.items()}
    gen = generation(path, args.repeats, args.new_tokens)
    lines = [
        f"# HF checkpoint load and greedy generation: tessera vs transformers ({datetime.date.today():%Y-%m})",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}, "
        f"transformers {__import__('transformers').__version__}",
        f"- model: {path} (fp32, {load['tessera']['param_mb']:.0f} MB of parameters)",
        f"- command: `python benchmarks/hf_load_generate.py --repeats {args.repeats} --new-tokens {args.new_tokens}`",
        "",
        "| | tessera | transformers | tessera / transformers |",
        "|---|---|---|---|",
        f"| load_hf vs from_pretrained, s (median of {args.repeats}, fresh process) | {load['tessera']['s']:.2f} | "
        f"{load['transformers']['s']:.2f} | {load['tessera']['s'] / load['transformers']['s']:.2f} |",
        f"| peak host memory growth while loading, MB | {load['tessera']['peak_mb']:.0f} | "
        f"{load['transformers']['peak_mb']:.0f} | {load['tessera']['peak_mb'] / load['transformers']['peak_mb']:.2f} |",
        f"| the same after reading every weight once, MB | {load['tessera']['touched_mb']:.0f} | "
        f"{load['transformers']['touched_mb']:.0f} | {load['tessera']['touched_mb'] / load['transformers']['touched_mb']:.2f} |",
        f"| greedy decode, tokens/s ({args.new_tokens} new, prompt {gen['prompt_tokens']} tokens, batch 1) | "
        f"{gen['tessera']:.1f} | {gen['transformers']:.1f} | {gen['tessera'] / gen['transformers']:.2f} |",
        "",
        f"Both produced the same {args.new_tokens} tokens: {gen['same_tokens']}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
