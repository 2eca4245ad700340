"""Checkpointing cost of tessera.checkpoint.Checkpointer vs torch.distributed.checkpoint (DCP) on CPU ranks (gloo).

    python benchmarks/checkpoint_cpu.py [--world 2] [--dim 512 --layers 8 ...] [--out benchmarks/results/...md]

Both frameworks train the same Llama-like model (tessera.models.llama) from the same initial weights on the same
batches in the same run: tessera sharded with `parallelize` + tessera.optim.AdamW, saved with
`Checkpointer.save(step, {"model": model, "optim": opt})`; torch FSDP2 (`fully_shard` per block + root) + torch
AdamW, saved with `dcp.async_save(get_state_dict(model, opt), ...)` on a gloo group of its own (tessera's
Checkpointer also uses a gloo group of its own). Reported, each the slowest rank's figure, median over repetitions:

1. training time lost per checkpoint: a loop of (C+1)*K steps with a checkpoint started after every K-th step
   (waiting for the previous one first; the last one is waited for at the end of the loop) minus the same loop
   without checkpoints, divided by C; plus the blocking time of the save call itself;
2. time until durable with no training running: tessera save()+wait(), DCP async_save()+result(), dcp.save();
3. write throughput: checkpoint bytes per rank / time until durable, against `dd ... conv=fdatasync` of the same
   size run by every rank at once on the same disk;
4. load time: Checkpointer.load vs dcp.load + set_state_dict at the saving world size, from the page cache
   ("warm") and after evicting the files with posix_fadvise(DONTNEED) ("cold"); then both again in a separate
   1-rank run loading the 2-rank checkpoints (resharding).
After every load the loaded state is compared with the state at save time (same world: every local tensor
exactly; 1 rank: a few full parameters exactly and the global sums of squares of the AdamW moments).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re

import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoint_sides import CHECK_PARAMS, DcpSide, TesseraSide, cpu  # noqa: E402


def make_cfg(args):
    from tessera.models.llama import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=args.seq)


def now() -> float:
    return time.perf_counter()


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def _evict(path: str) -> None:
    """Drops the (clean, already synced) pages of every file under `path` from the page cache."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Results:
    """Lists of floats per key, reduced to the slowest rank's value per repetition at the end."""

    def __init__(self):
        self.d: dict[str, list[float]] = {}

    def add(self, key, value):
        self.d.setdefault(key, []).append(float(value))

    def reduce(self, op=dist.ReduceOp.MAX) -> dict[str, list[float]]:
        out = {}
        for key in sorted(self.d):
            t = torch.tensor(self.d[key], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            out[key] = t.tolist()
        return out


def run_loop(side, batches, n_steps, every, checkpoint, res, tag):
    """n_steps training steps; with `checkpoint`, a save after every `every`-th step but the last."""
    pending = None
    dist.barrier()
    t0, c0 = now(), cpu()
    for i in range(n_steps):
        ts = now()
        side.train_step(batches[side.steps % len(batches)])
        res.add(f"{tag}/step_s", now() - ts)
        if checkpoint and (i + 1) % every == 0 and i + 1 < n_steps:
            tw = now()
            if pending is not None:
                side.wait(pending)
            tb = now()
            pending = side.save_async(side.steps)
            res.add(f"{tag}/wait_prev_s", tb - tw)
            res.add(f"{tag}/block_s", now() - tb)
    if pending is not None:
        tw = now()
        side.wait(pending)
        res.add(f"{tag}/wait_last_s", now() - tw)
    res.add(f"{tag}/loop_s", now() - t0)
    res.add(f"{tag}/loop_cpu_s", cpu() - c0)
    side.cleanup()


def run_dd(path, mib) -> tuple[float, float]:
    """dd of `mib` MiB with fdatasync into `path`; returns (bytes, seconds) from dd's own report."""
    p = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fdatasync"],
                       capture_output=True, text=True, check=True)
    os.unlink(path)
    m = re.search(r"^(\d+) bytes.*copied, ([0-9.e+-]+) s", p.stderr, re.M)
    return float(m.group(1)), float(m.group(2))


def compare_local(side, snapshot) -> int:
    bad = 0
    for k, t in side.local_tensors().items():
        if k not in snapshot or not torch.equal(t, snapshot[k]):
            bad += 1
    return bad + len(set(snapshot) - set(side.local_tensors()))


def compare_fingerprint(fp, ref) -> int:
    bad = sum(0 if torch.equal(fp["full"][k], ref["full"][k]) else 1 for k in CHECK_PARAMS)
    for k in ("exp_avg", "exp_avg_sq"):
        if abs(fp[k] - ref[k]) > 1e-9 * max(abs(ref[k]), 1e-30):
            bad += 1
    if fp["step"] != ref["step"]:
        bad += 1
    return bad


def worker(rank, world, init_file, args, out_file):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = make_cfg(args)
    g = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    res = Results()
    sides = [TesseraSide(cfg, args.root, seed=0), DcpSide(cfg, args.root, seed=0)]
    for side in sides:  # warm-up (allocations, optimizer state)
        for _ in range(args.warmup):
            side.train_step(batches[side.steps % len(batches)])
    state_bytes = sum(t.numel() * t.element_size() for t in sides[0].local_tensors().values())
    every, n_ckpt = args.every, args.checkpoints
    n_steps = (n_ckpt + 1) * every

    # 1. training time lost per checkpoint (frameworks and modes interleaved, order alternating by round)
    for rnd in range(args.rounds):
        order = sides if rnd % 2 == 0 else sides[::-1]
        for side in order:
            modes = (False, True) if rnd % 2 == 0 else (True, False)
            for ckpt in modes:
                run_loop(side, batches, n_steps, every, ckpt, res, f"{side.name}/{'ckpt' if ckpt else 'plain'}")
        if rank == 0:
            print(f"round {rnd} done", flush=True)

    # 2. time until durable, no training running
    for rep in range(args.reps):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            dist.barrier()
            t0, c0 = now(), cpu()
            h = side.save_async(side.steps + 1000 * (rep + 1))
            res.add(f"{side.name}/idle_block_s", now() - t0)
            side.wait(h)
            res.add(f"{side.name}/durable_s", now() - t0)
            res.add(f"{side.name}/save_cpu_s", cpu() - c0)
            side.cleanup()
            if side.name == "dcp":
                dist.barrier()
                t0 = now()
                side.save_sync(side.steps + 1000 * (rep + 1) + 500)
                res.add("dcp/sync_save_s", now() - t0)
                side.cleanup()
    bytes_per_rank = {}
    for side in sides:
        bytes_per_rank[side.name] = _dir_bytes(side.ckpt_dir(side.last_saved)) / world
    if rank == 0:
        print("durable done", flush=True)

    # 3. dd of the checkpoint's size per rank, every rank at once, same disk
    mib = max(1, round(max(bytes_per_rank.values()) / 2**20))
    for _ in range(args.reps):
        dist.barrier()
        t0 = now()
        nbytes, secs = run_dd(os.path.join(args.root, f"dd-{rank}.tmp"), mib)
        res.add("dd/s", secs)
        res.add("dd/wall_s", now() - t0)
    res.add("dd/bytes", nbytes)

    # 4. load at the same world size, cold (evicted) and warm (page cache); the state was saved last and not
    # changed since (no training after the last save), so it is the reference.
    snapshots = {s.name: {k: t.clone() for k, t in s.local_tensors().items()} for s in sides}
    fingerprints = {s.name: s.fingerprint() for s in sides}
    for rep in range(args.reps):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            for mode in ("cold", "warm"):
                side.zero_state()
                if rep == 0 and mode == "cold":  # the check below is not vacuous: zeroing changed the state
                    res.add(f"{side.name}/zeroed_unchanged", compare_local(side, snapshots[side.name]) == 0)
                if mode == "cold" and rank == 0:
                    _evict(side.ckpt_dir(side.last_saved))
                dist.barrier()
                t0 = now()
                side.load(side.last_saved)
                res.add(f"{side.name}/load_{mode}_s", now() - t0)
                res.add(f"{side.name}/load_mismatch", compare_local(side, snapshots[side.name]))
    if rank == 0:
        print("load done", flush=True)

    out = res.reduce()
    if rank == 0:
        out["_bytes_per_rank"] = bytes_per_rank
        out["_state_bytes_rank0"] = state_bytes
        out["_params"] = cfg.num_params()
        out["_ref"] = {s.name: s.last_saved for s in sides}
        out["_fingerprints"] = fingerprints
        torch.save(out, out_file)
    dist.barrier()
    dist.destroy_process_group()
    from tessera.process import end_spawned_rank

    end_spawned_rank()  # see [Note: ending spawned rank processes] in tessera/process.py


def worker_reshard(rank, world, init_file, args, ref_file, out_file):
    """Loads the checkpoints saved by the multi-rank run at a different world size (1 by default)."""
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ref = torch.load(ref_file, weights_only=True)
    cfg = make_cfg(args)
    res = Results()
    errors = {}
    sides = [TesseraSide(cfg, args.root, seed=1), DcpSide(cfg, args.root, seed=1)]
    sides[1].state()  # DCP: creates the AdamW state (a zero-lr step), outside the timed loads
    for rep in range(args.reps):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            if side.name in errors:
                continue
            for mode in ("cold", "warm"):
                side.zero_state()
                if mode == "cold" and rank == 0:
                    _evict(side.ckpt_dir(ref["_ref"][side.name]))
                dist.barrier()
                t0 = now()
                try:
                    side.load(ref["_ref"][side.name])
                except Exception as e:  # report, don't abort the benchmark
                    errors[side.name] = f"{type(e).__name__}: {str(e)[:400]}"
                    break
                res.add(f"{side.name}/reshard_load_{mode}_s", now() - t0)
                res.add(f"{side.name}/reshard_mismatch",
                        compare_fingerprint(side.fingerprint(), ref["_fingerprints"][side.name]))
    for side in sides:  # keep every rank's key set identical even if a load failed
        for mode in ("cold", "warm"):
            res.d.setdefault(f"{side.name}/reshard_load_{mode}_s", [])
        res.d.setdefault(f"{side.name}/reshard_mismatch", [])
    out = res.reduce()
    if rank == 0:
        out["_errors"] = errors
        torch.save(out, out_file)
    dist.barrier()
    dist.destroy_process_group()
    from tessera.process import end_spawned_rank

    end_spawned_rank()  # see [Note: ending spawned rank processes] in tessera/process.py


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _sh(cmd) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception as e:  # pragma: no cover
        return f"({e})"


def report(args, res, rs, wall) -> str:
    world = args.world
    every, n_ckpt = args.every, args.checkpoints
    n_steps = (n_ckpt + 1) * every
    bpr = res["_bytes_per_rank"]
    med = {k: _med(v) for k, v in res.items() if not k.startswith("_")}
    med.update({k: _med(v) for k, v in rs.items() if not k.startswith("_")})

    def lost(fw):
        pl, ck = res[f"{fw}/plain/loop_s"], res[f"{fw}/ckpt/loop_s"]
        per_round = [(c - p) / n_ckpt for p, c in zip(pl, ck)]
        return _med(per_round), per_round

    def ratio(a, b):
        return f"{a / b:.2f}" if b == b and a == a and b > 1e-3 else "-"

    dd_tput = med["dd/bytes"] / med["dd/s"]
    rows = []

    def row(what, t, d, unit="s", fmt="{:.3f}"):
        rows.append(f"| {what} | {fmt.format(t)} | {fmt.format(d)} | {ratio(t, d)} |")

    lt, lt_rounds = lost("tessera")
    ld, ld_rounds = lost("dcp")
    row(f"training time lost per checkpoint (s), K={every} steps of cover", lt, ld)
    row("  blocking time of the save call (s) [DCP: get_state_dict + async_save]",
        med["tessera/ckpt/block_s"], med["dcp/ckpt/block_s"])
    row("  wait for the previous save before the next (s)",
        _med(res["tessera/ckpt/wait_prev_s"] + res["tessera/ckpt/wait_last_s"]),
        _med(res["dcp/ckpt/wait_prev_s"] + res["dcp/ckpt/wait_last_s"]))
    row("  median step time, no checkpoint (s)", med["tessera/plain/step_s"], med["dcp/plain/step_s"])
    row("  median step time, checkpointing loop (s)", med["tessera/ckpt/step_s"], med["dcp/ckpt/step_s"])

    def extra_cpu(fw):
        return _med([(c - p) / n_ckpt for p, c in zip(res[f"{fw}/plain/loop_cpu_s"], res[f"{fw}/ckpt/loop_cpu_s"])])

    row("  extra CPU time of the process per checkpoint in the loop (s)", extra_cpu("tessera"), extra_cpu("dcp"))
    row("time until durable, idle: save()+wait() / async_save()+result() (s)",
        med["tessera/durable_s"], med["dcp/durable_s"])
    row("  blocking time of the save call, idle (s)", med["tessera/idle_block_s"], med["dcp/idle_block_s"])
    row("  CPU time of this process per save, idle (s, user+sys, all threads)",
        med["tessera/save_cpu_s"], med["dcp/save_cpu_s"])
    row("time of a synchronous save: save().wait() / dcp.save (s)", med["tessera/durable_s"], med["dcp/sync_save_s"])
    tt, td = bpr["tessera"] / med["tessera/durable_s"], bpr["dcp"] / med["dcp/durable_s"]
    rows.append(f"| write throughput per rank (MB/s), async save until durable | {tt / 1e6:.0f} "
                f"({100 * tt / dd_tput:.0f}% of dd) | {td / 1e6:.0f} ({100 * td / dd_tput:.0f}% of dd) | "
                f"{ratio(tt, td)} |")
    tsync = bpr["dcp"] / med["dcp/sync_save_s"]
    rows.append(f"| write throughput per rank (MB/s), dcp.save | - | {tsync / 1e6:.0f} "
                f"({100 * tsync / dd_tput:.0f}% of dd) | - |")
    for mode in ("cold", "warm"):
        row(f"load at world {world}, {mode} (s) [DCP: get_state_dict + dcp.load + set_state_dict]",
            med[f"tessera/load_{mode}_s"], med[f"dcp/load_{mode}_s"])
    for mode in ("cold", "warm"):
        row(f"load of the {world}-rank checkpoint on {args.reshard_world} rank(s), {mode} (s)",
            med.get(f"tessera/reshard_load_{mode}_s", float("nan")),
            med.get(f"dcp/reshard_load_{mode}_s", float("nan")))

    def ok(key, src):
        v = src.get(key, [])
        if not v:
            return "not run"
        return "OK" if max(v) == 0 else f"MISMATCH ({int(max(v))} tensors/values)"

    mem_gib = _sh("free -g | awk '/Mem:/{print $2}'")
    lines = [
        f"# Checkpointing on {world} CPU ranks (gloo): tessera Checkpointer vs torch.distributed.checkpoint",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.machine()}, {mem_gib} GiB RAM); torch {torch.__version__}; "
        f"{args.threads} torch thread(s)/rank",
        f"- disk of the checkpoint directory ({args.root}): `{args.df}` ({args.fstype})",
        f"- model: tessera.models.llama, {res['_params'] / 1e6:.1f} M params (dim {args.dim}, {args.layers} layers, "
        f"ffn {args.ffn}, vocab {args.vocab}); batch {args.batch}/rank x seq {args.seq}; AdamW. tessera: parallelize + "
        "tessera.optim.AdamW + Checkpointer(keep_last=2). DCP: fully_shard per block + root, torch.optim.AdamW, "
        "get_state_dict/set_state_dict, async_save/save/load on a gloo group of its own, default FileSystemWriter.",
        f"- state per rank: {res['_state_bytes_rank0'] / 1e6:.0f} MB in memory (fp32 params + exp_avg + exp_avg_sq "
        f"shards); on disk per rank: tessera {bpr['tessera'] / 1e6:.0f} MB, DCP {bpr['dcp'] / 1e6:.0f} MB",
        f"- lost time: {args.rounds} rounds x ({n_steps} steps without, {n_steps} steps with a checkpoint started "
        f"after every K={every} steps ({n_ckpt} checkpoints; each save first waits for the previous one, the last one "
        "is waited for at the end of the loop)), per framework, interleaved; "
        f"lost = (loop with - loop without) / {n_ckpt}; per round: tessera "
        f"{', '.join(f'{x:.3f}' for x in lt_rounds)} s, DCP {', '.join(f'{x:.3f}' for x in ld_rounds)} s",
        f"- durable / load / dd: {args.reps} repetitions each, frameworks interleaved; all figures are the slowest "
        "rank's, median over repetitions. cold = files evicted with posix_fadvise(DONTNEED) before the load; "
        "warm = in the page cache",
        f"- dd: `dd if=/dev/zero of=<ckpt dir>/dd-RANK.tmp bs=1M count={int(med['dd/bytes'] / 2**20)} conv=fdatasync` "
        f"on every rank at once: {dd_tput / 1e6:.0f} MB/s per rank (dd's own figure, median), "
        f"{world * dd_tput / 1e6:.0f} MB/s together",
        f"- command: `python benchmarks/checkpoint_cpu.py {' '.join(sys.argv[1:])}` (whole run {wall:.0f} s)",
        "",
        "| measure | tessera | DCP | tessera / DCP |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Correctness after load (world {world}, every local tensor exact): tessera "
        f"{ok('tessera/load_mismatch', res)}, DCP {ok('dcp/load_mismatch', res)}. "
        f"After loading on {args.reshard_world} rank(s) ({', '.join(CHECK_PARAMS)} exact, AdamW moments' sums of "
        f"squares, step): tessera {ok('tessera/reshard_mismatch', rs)}, DCP {ok('dcp/reshard_mismatch', rs)}. "
        "Before each checked load the state is zeroed (every local tensor then differs from the snapshot: "
        f"tessera {'no' if max(res['tessera/zeroed_unchanged']) else 'yes'}, "
        f"DCP {'no' if max(res['dcp/zeroed_unchanged']) else 'yes'}).",
    ]
    for fw, err in rs.get("_errors", {}).items():
        lines.append(f"\n**{fw} failed to load on {args.reshard_world} rank(s):** `{err}`")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reshard-world", type=int, default=1, help="world size of the second (loading) run")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--every", type=int, default=2, help="K: steps between checkpoints")
    p.add_argument("--checkpoints", type=int, default=4, help="C: checkpoints per loop (loop = (C+1)*K steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=4, help="repetitions of the durable, dd and load measurements")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--root", default=os.path.join(REPO, "build", "ckpt-bench"),
                   help="checkpoint directory (removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", help="write a markdown result file here")
    args = p.parse_args()
    args.root = os.path.abspath(args.root)
    shutil.rmtree(args.root, ignore_errors=True)
    os.makedirs(args.root)
    t_start = now()
    args.df = _sh("df -h " + args.root + " | tail -1")
    args.fstype = _sh("findmnt -n -o FSTYPE -T " + args.root)
    try:
        with tempfile.TemporaryDirectory() as d:
            out_file, rs_file = os.path.join(d, "result.pt"), os.path.join(d, "reshard.pt")
            mp.spawn(worker, args=(args.world, os.path.join(d, "init"), args, out_file), nprocs=args.world)
            mp.spawn(worker_reshard, args=(args.reshard_world, os.path.join(d, "init2"), args, out_file, rs_file),
                     nprocs=args.reshard_world)
            res = torch.load(out_file, weights_only=True)
            rs = torch.load(rs_file, weights_only=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    text = report(args, res, rs, now() - t_start)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
