"""Starting the doctor's ranks and running the checks on each: `tessera doctor` starts --nproc processes itself
(torch.multiprocessing spawn; gloo on CPU, NCCL with one GPU per rank on CUDA), or, under torchrun, this process
is one rank. Every rank runs the checks, the ranks exchange their results (as JSON bytes through an all_gather,
no pickle), and the report is built from all of them (report.py).

On CPU the ranks of a host share its cores and its disk, so the timed per-rank checks (GEMM, checkpoint write) run
one rank at a time, their rounds interleaved across ranks (checks.Turns), each rank using the cores a training rank
would get; otherwise a rank that the scheduler or another job happened to starve would be flagged as a straggler.
GPUs are each rank's own, so there the ranks run together (as in training: a GPU that throttles under a full
node's heat or power shows up).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tessera import knobs
from tessera.doctor import checks, nvml, report
from tessera.errors import InvalidArgumentError


@dataclass(frozen=True, kw_only=True)
class DoctorOptions:
    """What `tessera doctor` was asked (see the package docstring)."""

    device: str = "cpu"  # "cpu" or "cuda"
    nproc: int | None = None  # ranks to start (None: 2 on CPU, every visible GPU on CUDA); ignored under torchrun
    checkpoint_dir: str | None = None  # None: a fresh temporary directory per rank
    json_path: str | None = None
    margin: float = 0.25  # a figure more than this fraction below the ranks' median is flagged
    quick: bool = False

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise InvalidArgumentError(f"--device {self.device!r}: expected cpu or cuda")
        if self.nproc is not None and self.nproc < 1:
            raise InvalidArgumentError(f"--nproc {self.nproc}: expected at least 1 rank")
        if not 0 <= self.margin < 1:
            raise InvalidArgumentError(f"--margin {self.margin}: expected a fraction in [0, 1), e.g. 0.25")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def rank_checks(rank: int, world: int, device: torch.device, opts: DoctorOptions) -> dict:
    """Runs every check on this rank (a collective call: every rank of the default group calls it)."""
    slow = knobs.doctor_slow_rank() == rank
    cpu = device.type == "cpu" and world > 1
    results: list[checks.Result] = []

    def add(name, fn, *args):
        results.extend(checks.run_check(rank, name, fn, *args))

    def turns():  # interleaved timed rounds on CPU (see checks.Turns)
        return checks.Turns(rank, world, dist.barrier) if cpu else checks.Turns.alone()

    with tempfile.TemporaryDirectory(prefix="tessera-doctor-") as tmp:
        add("gemm", checks.gemm, device, opts.quick, slow, turns())
        for turn in range(world if cpu else 1):  # not timed for comparison, but memory-hungry: one rank at a time
            if not cpu or turn == rank:
                add("memory", checks.memory, device, opts.quick)
            if cpu:
                dist.barrier()
        add("host_device", checks.host_device, device, opts.quick)
        add("collectives", checks.collectives, device, world, opts.quick)
        add("checkpoint_write", checks.checkpoint_dir, opts.checkpoint_dir or tmp, rank, opts.quick, turns())
        add("nvml", nvml.nvml_health, device)
    return {"rank": rank, "host": socket.gethostname(), "device_name": _device_name(device),
            "results": [r.to_json() for r in results]}


def exchange(mine: dict, device: torch.device) -> list[dict]:
    """Every rank's dict (JSON through two all_gathers: the lengths, then the padded bytes)."""
    payload = torch.frombuffer(bytearray(json.dumps(mine).encode()), dtype=torch.uint8).to(device)
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [json.loads(bytes(g[: int(s.item())].cpu().numpy())) for g, s in zip(gathered, sizes)]


def _rank_main(rank: int, world: int, opts: DoctorOptions, init_file: str | None) -> list[dict]:
    if opts.device == "cuda":
        device = torch.device("cuda", rank if init_file else knobs.torchrun_local_rank())
        torch.cuda.set_device(device)
        backend, kw = "nccl", {"device_id": device}
    else:
        device, backend, kw = torch.device("cpu"), "gloo", {}
    if init_file:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world, **kw)
    else:  # torchrun: rank and world size from its environment
        dist.init_process_group(backend, **kw)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":  # the cores a training rank would get (launch.py does the same)
        local = knobs.torchrun_local_world_size() if not init_file else world
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    try:
        return exchange(rank_checks(rank, world, device, opts), device)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, opts: DoctorOptions, init_file: str, out_path: str) -> None:
    from tessera.process import end_spawned_rank

    try:
        ranks = _rank_main(rank, world, opts, init_file)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(ranks, f)
    except BaseException:  # noqa: BLE001 - report and end this rank; the others fail their next collective
        traceback.print_exc()
        end_spawned_rank(1)
    end_spawned_rank()  # see [Note: ending spawned rank processes] in tessera/process.py


def _finish(ranks: list[dict], opts: DoctorOptions, *, show: bool) -> int:
    rep = report.build_report(ranks, device=opts.device, margin=opts.margin, quick=opts.quick)
    if show:
        print(report.table(rep), flush=True)
        if opts.json_path:
            report.write_json(rep, opts.json_path)
    return rep["exit_status"]


def run_doctor(opts: DoctorOptions) -> int:
    """Runs the checks on every rank; prints the table (and writes --json) once; returns the exit status (0: all
    passed, 1: a check failed or a rank is flagged). InvalidArgumentError for a device or rank count that cannot
    be had."""
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda but no CUDA device is visible")
    if knobs.launched_by_torchrun():
        ranks = _rank_main(0, 0, opts, None)
        return _finish(ranks, opts, show=knobs.torchrun_rank() == 0)
    world = opts.nproc or (torch.cuda.device_count() if opts.device == "cuda" else 2)
    if opts.device == "cuda" and world > torch.cuda.device_count():
        raise InvalidArgumentError(f"--nproc {world} but only {torch.cuda.device_count()} GPU(s) are visible")
    with tempfile.TemporaryDirectory(prefix="tessera-doctor-") as d:
        out_path = os.path.join(d, "ranks.json")
        try:
            mp.spawn(_spawned, args=(world, opts, os.path.join(d, "init"), out_path), nprocs=world, join=True)
        except mp.ProcessExitedException as e:
            print(f"tessera doctor: rank {e.error_index} exited with status {e.exit_code} before reporting "
                  "(its error is above)", file=sys.stderr)
            return 1
        with open(out_path) as f:
            ranks = json.load(f)
    return _finish(ranks, opts, show=True)
