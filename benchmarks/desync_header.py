"""What the header exchange before every gloo collective costs (see [Note: a header before every gloo collective]
in csrc/tessera/comm/desync.h): the same collectives and the same training step with and without it, in one run.

    python benchmarks/desync_header.py [--world 2] [--rounds 5] [--out benchmarks/results/...md]

Two tessera communicators over two gloo groups of the same ranks, one with headers (the default) and one built with
`headers=False` (only for this measurement), are interleaved round by round so machine noise hits both alike:
1. latency of one all-gather per size (16 B, 256 KiB, 16 MiB per rank), median over rounds, slowest rank;
2. the step time of tessera.models.llama tiny (sharded per block + root, AdamW), one model per communicator, from
   the same initial weights on the same batches (the losses must agree: the header changes no value).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _communicators():
    from tessera.shard import comm as tc

    on = tc.communicator(dist.group.WORLD, torch.device("cpu"))
    other = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
    real = tc._pg_communicator

    def without_headers(group):  # the same communicator as tessera makes, without the header exchange
        store = dist.distributed_c10d._get_default_store()
        return tc._C.pg_communicator(tc._own_group(group, store, "bench/off/"), store=store, key_prefix="bench/off",
                                     user_group=group, headers=False)

    tc._pg_communicator = without_headers
    try:
        off = tc.communicator(other, torch.device("cpu"))
    finally:
        tc._pg_communicator = real
    return {"headers": (on, dist.group.WORLD), "no headers": (off, other)}


def _timed(fn, n: int) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def worker(rank, world, init_file, args, out_file):
    import tessera
    from tessera.models.llama import Llama, LlamaConfig, parallelize
    from tessera.models.llama.model import cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comms = _communicators()
    sizes = [4, 64 * 1024, 4 * 1024 * 1024]  # float32 elements per rank
    lat = {(k, n): [] for k in comms for n in sizes}
    cfg = LlamaConfig.tiny()
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq)
    models = {}
    for k, (_, group) in comms.items():
        torch.manual_seed(0)
        m = Llama(cfg)
        parallelize(m, group=group)
        n_units = len(m.layers) + 1
        models[k] = (m, tessera.optim.AdamW(m.parameters(), lr=1e-4))
    g = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, cfg.vocab_size, (2, args.seq + 1), generator=g) for _ in range(4)]
    steps = {k: [] for k in comms}
    losses = {k: [] for k in comms}
    for _ in range(args.rounds):
        for k, (comm, _) in comms.items():
            for n in sizes:
                x, out = torch.ones(n), torch.empty(world * n)
                reps = 200 if n < 100_000 else 5
                comm.all_gather_into(out, x)  # warm-up
                lat[(k, n)].append(_timed(lambda: comm.all_gather_into(out, x), reps))
            model, opt = models[k]
            for i, b in enumerate(batches):
                dist.barrier()
                t0 = time.perf_counter()
                loss = cross_entropy(model(b[:, :-1]), b[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad()
                steps[k].append(time.perf_counter() - t0)
                losses[k].append(loss.item())
    med = {key: statistics.median(v) for key, v in lat.items()}
    step = {k: statistics.median(v[1:]) for k, v in steps.items()}
    worst = [None] * world
    dist.all_gather_object(worst, (med, step))
    if rank == 0:
        lat_w = {key: max(w[0][key] for w in worst) for key in med}
        step_w = {k: max(w[1][k] for w in worst) for k in step}
        lines = [
            f"- date: {datetime.date.today()}; machine: {platform.node()} ({os.cpu_count()} cores); torch "
            f"{torch.__version__}; {world} ranks, gloo, 1 thread/rank; {args.rounds} rounds interleaved",
            "",
            "| collective | with header (us) | without (us) | header cost (us) |",
            "|---|---|---|---|",
        ]
        for n in sizes:
            a, b = lat_w[("headers", n)] * 1e6, lat_w[("no headers", n)] * 1e6
            lines.append(f"| all_gather {n * 4} B/rank | {a:.0f} | {b:.0f} | {a - b:+.0f} |")
        a, b = step_w["headers"], step_w["no headers"]
        lines += [
            "",
            f"tiny Llama step (tessera.models.llama tiny, {n_units} units, batch 2 x seq {args.seq}, AdamW): "
            f"{a * 1e3:.1f} ms with headers, "
            f"{b * 1e3:.1f} ms without ({(a / b - 1) * 100:+.1f}%); losses equal: "
            f"{losses['headers'] == losses['no headers']}",
        ]
        text = "\n".join(lines)
        print(text)
        with open(out_file, "w") as f:
            f.write(text + "\n")
    dist.barrier()
    from tessera.process import end_spawned_rank

    end_spawned_rank()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=None, help="also append the table to this markdown file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out_file = os.path.join(d, "out.md")
        mp.start_processes(worker, args=(args.world, os.path.join(d, "init"), args, out_file), nprocs=args.world,
                           start_method="spawn")
        if args.out:
            with open(args.out, "a") as f, open(out_file) as r:
                command = f"python benchmarks/desync_header.py --rounds {args.rounds} --seq {args.seq}"
                f.write(f"\n## Run (command: `{command}`)\n\n")
                f.write(r.read())


if __name__ == "__main__":
    main()
