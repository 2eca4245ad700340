"""Step time of tessera vs torch FSDP2 (fully_shard) vs DDP on CPU ranks over gloo, same model, same batches.

    python benchmarks/train_step_cpu.py [--world 2] [--steps 20] [--out benchmarks/results/...md]

Each framework trains a Llama-like model (tessera.models.llama, LlamaConfig.tiny() by default) from the same
initial weights on the same batches, sharded per transformer block and then at the root, with AdamW. Reported:
median step time (forward + backward + optimizer) after warm-up, tokens/s, and the ratio tessera / FSDP2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def build(framework: str, cfg, seed: int = 0):
    from tessera.models.llama import Llama

    torch.manual_seed(seed)
    model = Llama(cfg)
    if framework == "tessera":
        import tessera
        from tessera.models.llama import parallelize

        parallelize(model)
        opt = tessera.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    elif framework == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    elif framework == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    else:
        raise ValueError(framework)
    return model, opt


def worker(rank, world, init_file, args, out_file):
    from tessera.models.llama import LlamaConfig
    from tessera.models.llama.model import cross_entropy

    profile = None
    if args.hook_profile:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from hook_profile import HookProfile

        profile = HookProfile()
        profile.install(count_cpp_calls=args.hook_profile == "calls")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = LlamaConfig.tiny()
    cfg.n_layers = args.layers
    cfg.max_seq_len = args.seq
    if args.dim:  # a narrower model: the hooks' fixed cost per unit shows next to less copy work
        cfg.dim, cfg.ffn_dim, cfg.vocab_size = args.dim, int(args.dim * 8 / 3), 256
    g = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    results = {}
    # Interleave frameworks round by round so machine noise hits all of them alike.
    models = {fw: build(fw, cfg) for fw in args.frameworks}
    times = {fw: [] for fw in args.frameworks}
    losses = {fw: [] for fw in args.frameworks}
    for rnd in range(args.rounds):
        for fw in args.frameworks:
            model, opt = models[fw]
            for i in range(args.steps):
                tok = batches[i % len(batches)]
                dist.barrier()
                t0 = time.perf_counter()
                loss = cross_entropy(model(tok[:, :-1]), tok[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad()
                dt = time.perf_counter() - t0
                if i >= args.warmup or rnd > 0:
                    times[fw].append(dt)
                elif profile is not None:
                    profile.reset()  # count measured steps only
                losses[fw].append(loss.item())
    for fw in args.frameworks:
        t = torch.tensor(times[fw])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
        results[fw] = {"median_s": statistics.median(t.tolist()), "first_loss": losses[fw][0],
                       "last_loss": losses[fw][-1]}
    if profile is not None:
        steps, units = len(times["tessera"]), args.layers + 1
        results["_hooks"] = {"us_per_unit_step": profile.seconds / steps / units * 1e6,
                             "cpu_us_per_unit_step": profile.cpu_seconds / steps / units * 1e6,
                             "hook_calls_per_unit_step": profile.hook_calls / steps / units,
                             "cpp_calls_in_hooks_per_unit_step": profile.cpp_calls_in_hooks / steps / units,
                             "cpp_calls_per_step": profile.cpp_calls / steps}
    if rank == 0:
        results["_params"] = cfg.num_params()
        torch.save(results, out_file)
    dist.destroy_process_group()
    from tessera.process import end_spawned_rank

    end_spawned_rank()  # see [Note: ending spawned rank processes] in tessera/process.py


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=0, help="model width (default: LlamaConfig.tiny()'s 256)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--frameworks", nargs="+", default=["tessera", "fsdp2", "ddp"])
    p.add_argument("--out", help="write a markdown result file here")
    p.add_argument("--hook-profile", choices=["time", "calls"],
                   help="tessera only: time its hooks (time) or count their calls into C++ (calls); see hook_profile.py")
    args = p.parse_args()
    if args.hook_profile:
        args.frameworks = ["tessera"]
    with tempfile.TemporaryDirectory() as d:
        out_file = os.path.join(d, "result.pt")
        mp.spawn(worker, args=(args.world, os.path.join(d, "init"), args, out_file), nprocs=args.world)
        res = torch.load(out_file, weights_only=True)
    tokens = args.world * args.batch * args.seq
    lines = [
        f"# Training step time on {args.world} CPU ranks (gloo): tessera vs torch FSDP2 vs DDP",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}); torch {torch.__version__}; {args.threads} thread(s)/rank",
        f"- model: tessera.models.llama tiny ({res['_params'] / 1e6:.2f} M params, {args.layers} layers), "
        f"batch {args.batch}/rank x seq {args.seq}, AdamW; sharded per block + root",
        f"- {args.rounds} rounds x {args.steps} steps per framework, interleaved; median step time, slowest rank",
        f"- command: `python benchmarks/train_step_cpu.py {' '.join(sys.argv[1:])}`",
        "",
        "| framework | step time (s) | tokens/s | vs FSDP2 | first loss | last loss |",
        "|---|---|---|---|---|---|",
    ]
    base = res.get("fsdp2", {}).get("median_s")
    for fw in args.frameworks:
        r = res[fw]
        ratio = f"{r['median_s'] / base:.3f}" if base else "-"
        lines.append(f"| {fw} | {r['median_s']:.4f} | {tokens / r['median_s']:.0f} | {ratio} | "
                     f"{r['first_loss']:.4f} | {r['last_loss']:.4f} |")
    if base and "tessera" in res:
        lines += ["", f"**tessera / FSDP2 step-time ratio: {res['tessera']['median_s'] / base:.3f}** "
                      "(< 1.0 means tessera is faster)"]
    if "_hooks" in res:
        h = res["_hooks"]
        lines += ["", f"hooks ({args.hook_profile}), rank 0, per unit per step: {h['cpu_us_per_unit_step']:.1f} us "
                      f"CPU ({h['us_per_unit_step']:.1f} us wall, with collective waits) in "
                      f"{h['hook_calls_per_unit_step']:.2f} hook calls; calls into C++ from hooks: "
                      f"{h['cpp_calls_in_hooks_per_unit_step']:.2f}; calls into C++ per step in all: "
                      f"{h['cpp_calls_per_step']:.1f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
