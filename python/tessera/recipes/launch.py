"""Starting a job's ranks: under torchrun, this process is one rank; with `--max-restarts K` (or `--nproc N`),
`tessera run` starts its ranks through torch's elastic launcher (torch.distributed.run), which restarts the whole
group up to K times when a rank dies or fails, each restart resuming from the newest valid checkpoint; otherwise it
starts parallelism.world_size processes itself (CPU: gloo, one process per rank; CUDA: NCCL, one per GPU).
Exit statuses: tessera.exitcodes.

Device "auto" picks CUDA when a GPU is visible (NCCL, bf16 compute with fp32 master weights and fp32 gradient
reduction) and the CPU otherwise (gloo, fp32)."""

from __future__ import annotations

import datetime
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tessera
from tessera import exitcodes, knobs
from tessera.errors import InvalidArgumentError, TesseraError
from tessera.process import end_failed_rank, end_spawned_rank
from tessera.recipes.config import JobConfig
from tessera.resilience import heartbeat


def resolve_device(cfg: JobConfig) -> str:
    want = cfg.parallelism.device
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("parallelism.device=cuda but no CUDA device is visible")
    return want


def preflight(cfg: JobConfig) -> str:
    """What can be checked before any rank starts, so bad input fails once (not in every rank, nor in every restart)
    with exit status 2: the device, the data source, the model directory (fetched here, once). Returns the device
    type."""
    from tessera.recipes import build, data_sources

    device_type = resolve_device(cfg)
    data_sources.check_source(cfg)
    build.model_dir(cfg)
    return device_type


def mixed_precision(cfg: JobConfig, device_type: str):
    precision = cfg.training.precision
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    if precision == "bf16":
        return tessera.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def _rank_main(rank: int, world: int, device_type: str, init_file: str | None, cfg: JobConfig):
    from tessera.recipes.loop import train

    if device_type == "cuda":
        device = torch.device("cuda", rank if init_file else knobs.torchrun_local_rank())
        torch.cuda.set_device(device)
        backend, kw = "nccl", {"device_id": device}
    else:
        device = torch.device("cpu")
        backend, kw = "gloo", {}
    kw["timeout"] = datetime.timedelta(seconds=cfg.resilience.init_timeout_s)  # tightened after the first step
    # The store is built here (public torch.distributed.rendezvous, as init_process_group would) so that the heartbeat
    # uses the very store the group is built on.
    if init_file:
        store = next(dist.rendezvous(f"file://{init_file}", rank, world))[0]
    elif (w := knobs.elastic_worker()) is not None:
        # [Note: one store prefix per restart] The agent's store outlives a failed group: seen here, a restarted
        # group's gloo ranks read the previous attempt's listening addresses from it and failed with "Connection
        # refused" until the restarts ran out. Keys under a prefix of the restart count cannot be stale.
        store = dist.PrefixStore(f"tessera/attempt_{w.restart_count}",
                                 dist.TCPStore(w.master_addr, w.master_port, w.world_size, is_master=False))
        rank, world = w.rank, w.world_size
    else:  # torchrun without the agent's store: rank and world size from its environment
        store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, **kw)
    if device_type == "cpu":  # the machine's cores shared by the ranks on it (all of them, without torchrun)
        local = knobs.torchrun_local_world_size() if not init_file else world
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    beat = heartbeat.start(store, rank, world, cfg.resilience)
    finished = False
    try:
        summary = train(cfg, device=device, mixed_precision=mixed_precision(cfg, device_type))
        finished = True
        return summary
    finally:
        if beat is not None:
            beat.stop(finished=finished)
        dist.destroy_process_group()


def report(rank: int | str, e: BaseException) -> int:
    """Prints why rank `rank` failed (a one-line message for tessera's own errors, else the traceback) and returns
    its exit status (tessera.exitcodes)."""
    status = exitcodes.for_exception(e)
    if isinstance(e, TesseraError):
        print(f"tessera: error (rank {rank}, exit status {status}): {e}", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(e)
        print(f"tessera: rank {rank} failed (exit status {status})", file=sys.stderr, flush=True)
    return status


def _spawned(rank: int, world: int, device_type: str, init_file: str, cfg: JobConfig) -> None:
    try:
        _rank_main(rank, world, device_type, init_file, cfg)
    except BaseException as e:  # noqa: BLE001 - report and end this rank; the others fail their next collective
        end_failed_rank(report(rank, e))
    end_spawned_rank()  # see [Note: ending spawned rank processes] in tessera/process.py


def run(cfg: JobConfig) -> int:
    """Runs the job; returns the process exit status (0 on success). Raises InvalidArgumentError for what can be
    checked before ranks start (device, model directory, data source)."""
    device_type = preflight(cfg)
    if knobs.launched_by_torchrun():
        try:
            _rank_main(0, 0, device_type, None, cfg)  # rank and world come from torchrun
        except BaseException as e:  # noqa: BLE001
            end_failed_rank(report(knobs.torchrun_rank(), e))
        return exitcodes.OK
    world = cfg.parallelism.world_size or (torch.cuda.device_count() if device_type == "cuda" else 2)
    if device_type == "cuda" and world > torch.cuda.device_count():
        raise InvalidArgumentError(f"parallelism.world_size={world} but only {torch.cuda.device_count()} GPU(s) "
                                   "are visible")
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_spawned, args=(world, device_type, os.path.join(d, "init"), cfg), nprocs=world, join=True)
        except mp.ProcessExitedException as e:
            status = e.exit_code if e.exit_code and e.exit_code > 0 else 128 + (e.signal_num or 0) or 1
            print(f"tessera: rank {e.error_index} exited with status {status}", file=sys.stderr)
            return status
    return exitcodes.OK


def run_elastic(cfg: JobConfig, argv: list[str], *, nproc: int | None, max_restarts: int) -> int:
    """Runs `tessera run ARGV` as `nproc` ranks (default: parallelism.world_size, else 2 CPU ranks or every GPU)
    under torch's elastic agent on this node (rendezvous over a local c10d store), restarting the group up to
    `max_restarts` times after a failure; the ranks resume from the newest valid checkpoint. Returns the exit
    status: 0, or the failed rank's (restarts exhausted)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as elastic_run

    device_type = preflight(cfg)
    if cfg.checkpoint.every == 0:
        print("tessera: warning: checkpoint.every=0, so a restarted group starts from step 0", file=sys.stderr)
    n = nproc or cfg.parallelism.world_size or (torch.cuda.device_count() if device_type == "cuda" else 2)
    args = parse_args(["--standalone", "--nproc-per-node", str(n), "--max-restarts", str(max_restarts),
                       "--monitor-interval", "0.5", "-m", "tessera", "run", *argv])
    stop = threading.Event()
    threading.Thread(target=_continue_stopped_workers, args=(os.getpid(), stop), daemon=True).start()
    try:
        elastic_run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        status = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -9: killed by SIGKILL
        print(f"tessera: rank {rank} failed with exit status {status} after {max_restarts} restart(s)"
              f"{'' if exitcodes.restartable(status) else ' (a restart cannot help)'}", file=sys.stderr)
        return status
    finally:
        stop.set()
    return exitcodes.OK


def _continue_stopped_workers(agent_pid: int, stop: threading.Event) -> None:
    """[Note: ending a stopped worker] When a rank fails, torch's agent ends the group with SIGTERM and waits 30 s
    before SIGKILL (PContext.close, not configurable). A worker stopped with SIGSTOP (the hung rank the others just
    reported) cannot act on SIGTERM until it is continued, so every restart after a hang would wait those 30 s. This
    thread of the launcher continues any worker below it that is stopped with SIGTERM pending, so the SIGTERM ends
    it at once. Linux /proc only; elsewhere the agent's SIGKILL still ends it after 30 s."""
    while not stop.wait(0.25):
        for pid in _descendants(agent_pid):
            try:
                status = dict(line.split(":\t", 1) for line in
                              Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
                pending = int(status.get("ShdPnd", "0"), 16) | int(status.get("SigPnd", "0"), 16)
                if status.get("State", "").startswith("T") and pending & (1 << (signal.SIGTERM - 1)):
                    os.kill(pid, signal.SIGCONT)
            except (OSError, ValueError):
                continue  # gone meanwhile, or no /proc


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
        found += kids
        frontier += kids
    return found
