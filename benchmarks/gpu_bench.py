"""GPU checks and benchmarks, run on the lent GPU machine by scripts/gpu_check.sh (one H100 or H200, world size 1).

  1. correctness: a world-size-1 NCCL training step of tessera on a small Llama equals unsharded training.
  2. fused AdamW: tessera's kernel vs torch.optim.AdamW(fused=True) over the same 1.07e9 fp32 parameters, and the
     HBM copy bandwidth, as GB/s counting 28 bytes per parameter (read p, g, m, v; write p, m, v).
  3. training: tokens/s and MFU of tessera vs torch FSDP2 fully_shard (bf16 parameters, fp32 reduction, AdamW),
     both at world size 1 in this process, one after the other, on SmolLM2-135M (seq 2048, batch 16: the recipe's
     model) and Llama-3.2-1B (seq 2048, batch 4).
  4. checkpointing that model with AdamW (~18 GB): training time lost per checkpoint, tessera Checkpointer.save vs
     DCP async_save (10.7 s blocking measured on an H200), and time until durable.

Writes a markdown report to --out (default: $OUT/gpu_bench.md when OUT is set), section by section as each one
finishes, and prints it; a section that fails records its traceback and the next one still runs (exit status 1).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

import torch
import torch.distributed as dist


def _timed(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth(n_bytes: int = 4 << 30) -> float:
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = _timed(lambda: dst.copy_(src), 10)
    del src, dst
    return 2 * n_bytes / t / 1e9


def adamw_bench(n: int) -> dict:
    from tessera import _C

    res = {}
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda") * 1e-3
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    step = [0]

    def ours():
        step[0] += 1
        _C.adamw_step(p, g, m, v, 1e-4, 0.9, 0.999, 1e-8, 0.01, step[0], torch.cuda.current_stream().cuda_stream)

    res["tessera_s"] = _timed(ours, 10)
    del m, v
    tp = torch.nn.Parameter(p)
    tp.grad = g
    opt = torch.optim.AdamW([tp], lr=1e-4, weight_decay=0.01, fused=True)
    res["torch_fused_s"] = _timed(opt.step, 10)
    del opt, tp, p, g
    gc.collect()
    torch.cuda.empty_cache()
    return res


def correctness_step() -> float:
    """Max abs difference of parameters after 3 steps: tessera (NCCL, world 1, FULL_SHARD) vs unsharded torch."""
    import tessera
    from tessera.models.llama import Llama, LlamaConfig, parallelize
    from tessera.models.llama.model import cross_entropy

    cfg = LlamaConfig.tiny()
    torch.manual_seed(0)
    ref = Llama(cfg).cuda()
    torch.manual_seed(0)
    model = parallelize(Llama(cfg).cuda())
    opt = tessera.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        tok = torch.randint(0, cfg.vocab_size, (2, 129), device="cuda", generator=g)
        for mdl, o in ((model, opt), (ref, ropt)):
            cross_entropy(mdl(tok[:, :-1]), tok[:, 1:]).backward()
            o.step()
            o.zero_grad()
    got = tessera.full_state_dict(model)
    return max((got[k].cuda() - v).abs().max().item() for k, v in ref.state_dict().items())


def train_bench(framework: str, model_name: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """One framework's training throughput on a named tessera model (random init), world size 1: seconds per
    step (mean of `steps` after `warmup`), tokens/s, TFLOP/s and MFU from config.flops_per_token, peak GiB."""
    import tessera
    from tessera.metrics import mfu
    from tessera.models.llama import Llama, parallelize
    from tessera.models.llama.model import cross_entropy

    cfg = tessera.models.get(model_name).config
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Llama(cfg)
    if framework == "tessera":
        mp = tessera.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        parallelize(model, mixed_precision=mp)
        opt = tessera.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        pol = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mp_policy=pol)
        fully_shard(model, mp_policy=pol)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    tok = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda", generator=g)

    def step():
        loss = cross_entropy(model(tok[:, :-1]), tok[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    tokens_s = batch * seq / dt
    fpt = cfg.flops_per_token(seq)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"step_s": dt, "tokens_s": tokens_s, "tflops": fpt * tokens_s / 1e12,
            "mfu": mfu(fpt, tokens_s, torch.cuda.get_device_name(0)), "peak_gib": peak, "loss": loss.item()}


def checkpoint_bench(root: str, steps_between: int = 3) -> dict:
    """Training time lost per checkpoint on Llama-3.2-1B with AdamW (fp32 params + 2 states, about 15 GB): tessera Checkpointer.save vs DCP async_save on FSDP2, each measured as (steps with a save
    started - steps without) and as the blocking time of the save call; plus time until durable."""
    import shutil

    import tessera
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from tessera.models.llama import Llama, LlamaConfig, parallelize
    from tessera.models.llama.model import cross_entropy

    cfg = LlamaConfig.llama3_2_1b()
    cpu_group = dist.new_group(backend="gloo")
    out = {}
    for fw in ("tessera", "dcp"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Llama(cfg)
        if fw == "tessera":
            parallelize(model, mixed_precision=tessera.MixedPrecision(param_dtype=torch.bfloat16,
                                                                      reduce_dtype=torch.float32))
            opt = tessera.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            pol = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for layer in model.layers:
                fully_shard(layer, mp_policy=pol)
            fully_shard(model, mp_policy=pol)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        tok = torch.randint(0, cfg.vocab_size, (4, 2049), device="cuda")

        def step():
            cross_entropy(model(tok[:, :-1]), tok[:, 1:]).backward()
            opt.step()
            opt.zero_grad()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps_between):
            step()
        torch.cuda.synchronize()
        base = (time.perf_counter() - t0) / steps_between
        d = os.path.join(root, fw)
        shutil.rmtree(d, ignore_errors=True)
        ckpt = tessera.checkpoint.Checkpointer(d) if fw == "tessera" else None
        t0 = time.perf_counter()
        if fw == "tessera":
            handle = ckpt.save(1, {"model": model, "optim": opt})
        else:
            msd, osd = get_state_dict(model, opt)
            # async_save stages on the CPU and needs a CPU backend in its group (the default one is NCCL only).
            handle = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=d, process_group=cpu_group)
        blocked = time.perf_counter() - t0
        for _ in range(steps_between):
            step()
        torch.cuda.synchronize()
        with_ckpt = time.perf_counter() - t0
        handle.wait() if fw == "tessera" else handle.result()
        durable = time.perf_counter() - t0
        out[fw] = {"blocked_s": blocked, "lost_s": with_ckpt - steps_between * base, "durable_s": durable}
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
        shutil.rmtree(d, ignore_errors=True)
    return out


class Report:
    """The markdown report, rewritten to `path` after every section so a run cut short still leaves its results."""

    def __init__(self, path: str | None, header: list[str]):
        self.path, self.lines, self.failed = path, list(header), False
        self._flush()

    def add(self, lines: list[str]) -> None:
        self.lines += lines
        print("\n".join(lines), flush=True)
        self._flush()

    def section(self, title: str, fn) -> None:
        """Runs fn() -> list of lines under `title`; a raised error becomes the section's text (with traceback)."""
        import traceback

        t0 = time.perf_counter()
        try:
            body = fn()
        except Exception:  # noqa: BLE001 - a failing section is recorded and the next one runs
            self.failed = True
            body = ["FAILED:", "", "```", traceback.format_exc().rstrip(), "```"]
            gc.collect()
            torch.cuda.empty_cache()
        self.add([f"## {title}", ""] + body + ["", f"({time.perf_counter() - t0:.0f} s)", ""])

    def _flush(self) -> None:
        if self.path:
            with open(self.path, "w") as f:
                f.write("\n".join(self.lines) + "\n")


def _correctness() -> list[str]:
    diff = correctness_step()
    return [f"tiny Llama, 3 AdamW steps, tessera FULL_SHARD (NCCL) vs unsharded torch: "
            f"max |param difference| = {diff:.3e} ({'OK' if diff < 1e-4 else 'MISMATCH'})"]


def _adamw(n: int) -> list[str]:
    bw = copy_bandwidth()
    a = adamw_bench(n)
    ours_bw, torch_bw = 28 * n / a["tessera_s"] / 1e9, 28 * n / a["torch_fused_s"] / 1e9
    return [f"{n:.3g} fp32 parameters. HBM copy bandwidth (read+write): {bw:.0f} GB/s", "",
            "| optimizer | time (ms) | GB/s (28 B/param) | % of copy bandwidth |", "|---|---|---|---|",
            f"| tessera adamw_step | {a['tessera_s'] * 1e3:.2f} | {ours_bw:.0f} | {100 * ours_bw / bw:.1f}% |",
            f"| torch AdamW(fused=True) | {a['torch_fused_s'] * 1e3:.2f} | {torch_bw:.0f} | {100 * torch_bw / bw:.1f}% |",
            "", f"tessera / torch time ratio: {a['tessera_s'] / a['torch_fused_s']:.3f}"]


def _training(model_name: str, batch: int, seq: int, steps: int, warmup: int) -> list[str]:
    rows = {fw: train_bench(fw, model_name, batch, seq, steps, warmup) for fw in ("tessera", "fsdp2")}
    lines = [f"{model_name}, random init, seq {seq} x batch {batch}, bf16 params / fp32 reduce, AdamW; "
             f"{steps} timed steps after {warmup} warm-up", "",
             "| framework | step (s) | tokens/s | TFLOP/s | MFU | peak GiB | loss |", "|---|---|---|---|---|---|---|"]
    for fw, r in rows.items():
        m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {fw} | {r['step_s']:.4f} | {r['tokens_s']:,.0f} | {r['tflops']:.0f} | {m} | "
                     f"{r['peak_gib']:.1f} | {r['loss']:.4f} |")
    return lines + ["", f"tessera / FSDP2 tokens/s: {rows['tessera']['tokens_s'] / rows['fsdp2']['tokens_s']:.3f}"]


def _checkpoint(root: str) -> list[str]:
    c = checkpoint_bench(root)
    lines = ["| framework | save call blocked (s) | training time lost (s) | until durable (s) |", "|---|---|---|---|"]
    for fw, r in c.items():
        lines.append(f"| {fw} | {r['blocked_s']:.3f} | {r['lost_s']:.3f} | {r['durable_s']:.1f} |")
    return lines + ["", f"time lost tessera / DCP async_save: {c['tessera']['lost_s'] / max(c['dcp']['lost_s'], 1e-9):.3f}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "gpu_bench.md") if os.environ.get("OUT") else None)
    ap.add_argument("--adamw-params", type=float, default=1.07e9)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-checkpoint", action="store_true")
    ap.add_argument("--checkpoint-dir", default="/tmp", help="a directory on the disk to checkpoint to")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; nothing to run")
        return 0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    name = torch.cuda.get_device_name(0)
    rep = Report(args.out, [f"# tessera GPU checks on {name}", "",
                            f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; "
                            "world size 1 (NCCL)",
                            f"- command: `python benchmarks/gpu_bench.py {' '.join(sys.argv[1:])}`", ""])
    rep.section("1. Correctness", _correctness)
    rep.section("2. Fused AdamW", lambda: _adamw(int(args.adamw_params)))
    if not args.skip_train:
        rep.section("3a. Training SmolLM2-135M (the recipe's model)",
                    lambda: _training("smollm2-135m", 16, 2048, args.steps, args.warmup))
        rep.section("3b. Training Llama-3.2-1B",
                    lambda: _training("llama3.2-1b", 4, 2048, args.steps, args.warmup))
    if not args.skip_checkpoint:
        rep.section("4. Checkpoint of Llama-3.2-1B + AdamW (fp32 state, ~15 GB)",
                    lambda: _checkpoint(os.path.join(args.checkpoint_dir, "tessera-gpu-ckpt-bench")))
    dist.destroy_process_group()
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
