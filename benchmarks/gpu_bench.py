"""GPU checks and benchmarks, run on the lent GPU machine by scripts/gpu_check.sh (one H100 or H200, world size 1).

  1. correctness: a world-size-1 NCCL training step of tessera on a small Llama equals unsharded training.
  2. fused AdamW: tessera's kernel vs torch.optim.AdamW(fused=True) over the same 1.07e9 fp32 parameters, and the
     HBM copy bandwidth, as GB/s counting 28 bytes per parameter (read p, g, m, v; write p, m, v).
  3. training: tokens/s of tessera vs torch FSDP2 fully_shard on a Llama-3.2-1B-shaped model (seq 2048, batch 4,
     bf16 parameters, fp32 reduction, fused AdamW), both at world size 1 in this process, one after the other.
  4. checkpointing that model with AdamW (~18 GB): training time lost per checkpoint, tessera Checkpointer.save vs
     DCP async_save (10.7 s blocking measured on an H200), and time until durable.

Writes a markdown report to --out (default: $OUT/gpu_bench.md when OUT is set) and prints it.
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


def train_bench(framework: str, steps: int, warmup: int) -> dict:
    import tessera
    from tessera.models.llama import Llama, LlamaConfig, parallelize
    from tessera.models.llama.model import cross_entropy

    cfg = LlamaConfig.llama3_2_1b()
    batch, seq = 4, 2048
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
    n = cfg.num_params()
    flops = 6 * n * batch * seq + 12 * cfg.n_layers * batch * seq * seq * cfg.dim  # PaLM-style, incl. attention
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"step_s": dt, "tokens_s": batch * seq / dt, "tflops": flops / dt / 1e12, "peak_gib": peak,
            "loss": loss.item()}


def checkpoint_bench(root: str, steps_between: int = 3) -> dict:
    """Training time lost per checkpoint on the Llama-3.2-1B-shaped model with AdamW (fp32 params + 2 states,
    about 18 GB): tessera Checkpointer.save vs DCP async_save on FSDP2, each measured as (steps with a save
    started - steps without) and as the blocking time of the save call; plus time until durable."""
    import shutil

    import tessera
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from tessera.models.llama import Llama, LlamaConfig, parallelize
    from tessera.models.llama.model import cross_entropy

    cfg = LlamaConfig.llama3_2_1b()
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
            handle = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=d)
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
    lines = [f"# tessera GPU checks on {name}", "",
             f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; world size 1 (NCCL)",
             f"- command: `python benchmarks/gpu_bench.py {' '.join(sys.argv[1:])}`", ""]
    diff = correctness_step()
    lines += [f"## 1. Correctness", "", f"tiny Llama, 3 AdamW steps, tessera FULL_SHARD (NCCL) vs unsharded torch: "
              f"max |param difference| = {diff:.3e} ({'OK' if diff < 1e-4 else 'MISMATCH'})", ""]
    bw = copy_bandwidth()
    a = adamw_bench(int(args.adamw_params))
    n = int(args.adamw_params)
    ours_bw, torch_bw = 28 * n / a["tessera_s"] / 1e9, 28 * n / a["torch_fused_s"] / 1e9
    lines += ["## 2. Fused AdamW", "", f"HBM copy bandwidth (read+write): {bw:.0f} GB/s", "",
              "| optimizer | time (ms) | GB/s (28 B/param) | % of copy bandwidth |", "|---|---|---|---|",
              f"| tessera adamw_step | {a['tessera_s'] * 1e3:.2f} | {ours_bw:.0f} | {100 * ours_bw / bw:.1f}% |",
              f"| torch AdamW(fused=True) | {a['torch_fused_s'] * 1e3:.2f} | {torch_bw:.0f} | {100 * torch_bw / bw:.1f}% |",
              "", f"tessera / torch time ratio: {a['tessera_s'] / a['torch_fused_s']:.3f}", ""]
    if not args.skip_train:
        rows = {fw: train_bench(fw, args.steps, args.warmup) for fw in ("tessera", "fsdp2")}
        lines += ["## 3. Training, Llama-3.2-1B-shaped, seq 2048 x batch 4, bf16 params / fp32 reduce", "",
                  "| framework | step (s) | tokens/s | TFLOP/s | peak GiB | loss |", "|---|---|---|---|---|---|"]
        for fw, r in rows.items():
            lines.append(f"| {fw} | {r['step_s']:.4f} | {r['tokens_s']:,.0f} | {r['tflops']:.0f} | "
                         f"{r['peak_gib']:.1f} | {r['loss']:.4f} |")
        lines += ["", f"tessera / FSDP2 tokens/s: {rows['tessera']['tokens_s'] / rows['fsdp2']['tokens_s']:.3f}"]
    if not args.skip_checkpoint:
        root = os.path.join(args.checkpoint_dir, "tessera-gpu-ckpt-bench")
        c = checkpoint_bench(root)
        lines += ["", "## 4. Checkpoint of the Llama-3.2-1B-shaped model + AdamW (fp32 state, ~18 GB)", "",
                  "| framework | save call blocked (s) | training time lost (s) | until durable (s) |", "|---|---|---|---|"]
        for fw, r in c.items():
            lines.append(f"| {fw} | {r['blocked_s']:.3f} | {r['lost_s']:.3f} | {r['durable_s']:.1f} |")
        lines += ["", f"time lost tessera / DCP async_save: {c['tessera']['lost_s'] / max(c['dcp']['lost_s'], 1e-9):.3f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
