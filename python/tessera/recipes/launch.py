"""Starting a job's ranks: under torchrun, this process is one rank; with `--max-restarts K` (or `--nproc N`),
`tessera run` starts its ranks through torch's elastic launcher (torch.distributed.run), which restarts the whole
group up to K times when a rank dies or fails, each restart resuming from the newest valid checkpoint; otherwise it
starts parallelism.world_size processes itself (CPU: gloo, one process per rank; CUDA: NCCL, one per GPU).
Exit statuses: tessera.exitcodes; the job's status is its root cause's (see [Note: the root cause decides the job's
status] there), and a failure that a restart cannot help is not restarted. Ctrl-C (SIGINT) or SIGTERM to the
launcher stops every rank within seconds with status 130 (143); see [Note: ending a rank on Ctrl-C] in
tessera/process.py.

Device "auto" picks CUDA when a GPU is visible (NCCL, bf16 compute with fp32 master weights and fp32 gradient
reduction) and the CPU otherwise (gloo, fp32)."""

from __future__ import annotations

import datetime
import json
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.agent.server.api import WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

import tessera
from tessera import exitcodes, knobs, process
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


# After the first rank of a group fails, how long the launcher lets the others end by themselves (on gloo their
# collectives fail at once; their reports and tracebacks get out) before it kills them (on NCCL, or next to a
# stopped rank, they would wait for their collective timeout). The root cause is on disk already.
FAILURE_GRACE_S = 5.0
# After forwarding SIGINT or SIGTERM, how long the launcher waits for its ranks before SIGKILL: a rank ends within
# process.INTERRUPT_GRACE_S of SIGINT by itself.
STOP_GRACE_S = process.INTERRUPT_GRACE_S + 3.0


def _rank_main(rank: int, world: int, device_type: str, init_file: str | None, cfg: JobConfig,
               cause_dir: str | None = None):
    from tessera.recipes.loop import train

    process.exit_on_interrupt()
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
        if cause_dir is not None:
            process.set_cause_file(os.path.join(cause_dir, f"attempt-{w.restart_count}", f"rank-{rank}.json"), rank)
    else:  # torchrun without the agent's store: rank and world size from its environment
        store, rank, world = next(dist.rendezvous("env://"))
    beat, finished = None, False
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, **kw)
        if device_type == "cpu":  # the machine's cores shared by the ranks on it (all of them, without torchrun)
            local = knobs.torchrun_local_world_size() if not init_file else world
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        beat = heartbeat.start(store, rank, world, cfg.resilience)
        summary = train(cfg, device=device, mixed_precision=mixed_precision(cfg, device_type))
        finished = True
        return summary
    except BaseException as e:
        # Before the group closes, which is what makes the peers fail: see [Note: the root cause decides the job's
        # status] in tessera/exitcodes.py.
        _share_first_failure(store, rank, e)
        process.record_cause(exit_status(e), e)
        raise
    finally:
        if beat is not None:
            beat.stop(finished=finished)
        if dist.is_initialized():
            dist.destroy_process_group()


# How long a failing rank waits for the store when it shares its failure (the store may be gone with its host).
_FIRST_FAILURE_TIMEOUT_S = 2.0
_FIRST_FAILURE_KEY = "tessera/first_failure"


def _share_first_failure(store, rank: int, e: BaseException) -> None:
    """[Note: every rank reports the root cause's status] Launchers that tessera does not control take the job's
    status from the ranks' own: srun the highest of them, torchrun the first it sees. So a rank that fails puts its
    failure in the group's store under one key, first writer wins (compare_set), before it closes its
    communicators; a rank whose own failure is restartable (a lost peer, 75) and that finds there another rank's
    failure that a restart cannot help (a deterministic error, 1) was failing because of it, and takes its status
    (set as `e.exit_status`, which exitcodes.for_exception honours). The store is per attempt ([Note: one store
    prefix per restart]); one that does not answer within _FIRST_FAILURE_TIMEOUT_S (its host is gone) leaves the
    rank's own status."""
    if store is None or process.interrupted() or isinstance(e, KeyboardInterrupt):
        return
    status = exitcodes.for_exception(e)
    text = f"{type(e).__name__}: {e}".splitlines()[0][:2000]
    try:
        store.set_timeout(datetime.timedelta(seconds=_FIRST_FAILURE_TIMEOUT_S))
        first = json.loads(store.compare_set(_FIRST_FAILURE_KEY, "", json.dumps(
            {"rank": rank, "status": status, "error": text})))
    except Exception:  # noqa: BLE001 - the store is gone: this rank keeps its own status
        return
    if first.get("rank") != rank and exitcodes.restartable(status) and not exitcodes.restartable(first["status"]):
        print(f"tessera: rank {rank} takes exit status {first['status']} from the root cause: rank {first['rank']} "
              f"failed first ({first.get('error', '')})", file=sys.stderr, flush=True)
        try:
            e.exit_status = first["status"]
        except AttributeError:
            pass


def exit_status(e: BaseException) -> int:
    """The exit status of a rank that `e` ends (tessera.exitcodes): 130 for KeyboardInterrupt, and for any error
    after this process received SIGINT (its peers leaving is the interrupt's consequence, not a lost peer)."""
    if process.interrupted() or isinstance(e, KeyboardInterrupt):
        return exitcodes.INTERRUPTED
    return exitcodes.for_exception(e)


def report(rank: int | str, e: BaseException) -> int:
    """Prints why rank `rank` failed (a one-line message for tessera's own errors and for an interrupt, else the
    traceback), records it as the rank's cause (process.record_cause, if not yet) and returns its exit status
    (tessera.exitcodes)."""
    status = exit_status(e)
    process.record_cause(status, e)
    if status == exitcodes.INTERRUPTED:
        print(f"tessera: rank {rank} interrupted (exit status {status})", file=sys.stderr, flush=True)
    elif isinstance(e, TesseraError):
        print(f"tessera: error (rank {rank}, exit status {status}): {e}", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(e)
        print(f"tessera: rank {rank} failed (exit status {status})", file=sys.stderr, flush=True)
    return status


def _spawned(rank: int, world: int, device_type: str, init_file: str, cfg: JobConfig, cause_dir: str) -> None:
    process.set_cause_file(os.path.join(cause_dir, f"rank-{rank}.json"), rank)
    try:
        _rank_main(rank, world, device_type, init_file, cfg)
    except BaseException as e:  # noqa: BLE001 - report and end this rank; the others fail their next collective
        end_failed_rank(report(rank, e))
    end_spawned_rank()  # see [Note: ending spawned rank processes] in tessera/process.py


def run(cfg: JobConfig, *, cause_dir: str | None = None) -> int:
    """Runs the job; returns the process exit status (0 on success; else the root cause's, tessera.exitcodes).
    Raises InvalidArgumentError for what can be checked before ranks start (device, model directory, data source).
    cause_dir: where a rank under run_elastic's agent records why it failed (see run_elastic)."""
    device_type = preflight(cfg)
    if knobs.launched_by_torchrun():
        try:
            _rank_main(0, 0, device_type, None, cfg, cause_dir)  # rank and world come from torchrun
        except BaseException as e:  # noqa: BLE001
            end_failed_rank(report(knobs.torchrun_rank(), e))
        return exitcodes.OK
    world = cfg.parallelism.world_size or (torch.cuda.device_count() if device_type == "cuda" else 2)
    if device_type == "cuda" and world > torch.cuda.device_count():
        raise InvalidArgumentError(f"parallelism.world_size={world} but only {torch.cuda.device_count()} GPU(s) "
                                   "are visible")
    with tempfile.TemporaryDirectory() as d:
        causes = os.path.join(d, "causes")
        ctx = mp.start_processes(_spawned, args=(world, device_type, os.path.join(d, "init"), cfg, causes),
                                 nprocs=world, join=False, start_method="spawn")
        return _supervise(ctx.processes, causes)


def _supervise(procs: list, cause_dir: str) -> int:
    """Waits for the spawned ranks `procs` (rank r is procs[r]) and returns the job's exit status. After the first
    failure the others get FAILURE_GRACE_S to end by themselves, then SIGKILL; the status is the root cause's
    (exitcodes.job_status over the ranks' cause files and exit codes). SIGINT or SIGTERM to this process is
    forwarded to the ranks, which get STOP_GRACE_S before SIGKILL (a second one: SIGKILL at once); the status is
    then 128 + the signal (130, 143)."""
    stop: dict = {"signum": None, "now": False}

    def on_signal(signum, _frame):
        stop["now"] = stop["signum"] is not None  # a second Ctrl-C: no more grace
        stop["signum"] = stop["signum"] or signum
        for p in procs:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGKILL if stop["now"] else signum)
                except OSError:
                    pass

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}  # nohup, a background job: ignored, as before
    killed: set[int] = set()
    deadline = None
    try:
        while any(p.exitcode is None for p in procs):
            multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)
            now = time.monotonic()
            if deadline is None and stop["signum"] is not None:
                deadline = now + STOP_GRACE_S
            elif deadline is None and any(p.exitcode not in (None, 0) for p in procs):
                deadline = now + FAILURE_GRACE_S
            if deadline is not None and (now >= deadline or stop["now"]):
                for r, p in enumerate(procs):
                    if p.exitcode is None:
                        p.kill()  # SIGKILL also ends a stopped (SIGSTOP) rank
                        killed.add(r)
                for p in procs:
                    p.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop["signum"] is not None:
        status = exitcodes.for_signal(stop["signum"])
        print(f"tessera: interrupted by {signal.Signals(stop['signum']).name}: stopped {len(procs)} rank(s)"
              f"{f' ({len(killed)} killed after {STOP_GRACE_S:g} s)' if killed else ''}; exit status {status}. "
              "A checkpoint save in flight, if any, was not committed: starting again resumes from the newest "
              "committed checkpoint", file=sys.stderr, flush=True)
        return status
    causes = process.read_causes(cause_dir)
    ends = [_rank_end(r, p.exitcode, causes.get(r), by_launcher=r in killed) for r, p in enumerate(procs)]
    return _report_job(ends)


def _rank_end(rank: int, exitcode: int | None, cause: dict | None, *, by_launcher: bool) -> exitcodes.RankEnd:
    """A rank's end from its exit code (negative: killed by that signal; None: unknown, still running when its
    launcher gave up) and its cause record (which wins: it is the rank's own finding)."""
    if cause is not None:
        return exitcodes.RankEnd(rank, int(cause["status"]), reported=True, time=cause.get("time"),
                                 error=cause.get("error", ""))
    status = exitcode if exitcode is not None and exitcode >= 0 else exitcodes.for_signal(-(exitcode or -9))
    return exitcodes.RankEnd(rank, status, by_launcher=by_launcher or exitcode is None)


def _report_job(ends: list[exitcodes.RankEnd], restarts: str = "") -> int:
    """Prints the root cause of a failed job (and how the other ranks ended) and returns its status (0: none)."""
    root = exitcodes.job_status(ends)
    if root is None:
        return exitcodes.OK
    others = ", ".join(f"rank {e.rank}: {e.status}{' (stopped by the launcher)' if e.by_launcher else ''}"
                       for e in ends if e.rank != root.rank and e.status != exitcodes.OK)
    how = "was interrupted" if root.status in (exitcodes.INTERRUPTED, exitcodes.for_signal(signal.SIGTERM)) else \
        "failed"
    print(f"tessera: rank {root.rank} {how} with exit status {root.status}{restarts}"
          f"{': ' + root.error if root.error else ''}"
          f"{'' if exitcodes.restartable(root.status) else ' (a restart cannot help)'}"
          f"{f'; the other ranks ended after it ({others})' if others else ''}", file=sys.stderr, flush=True)
    return root.status


def run_elastic(cfg: JobConfig, argv: list[str], *, nproc: int | None, max_restarts: int) -> int:
    """Runs `tessera run ARGV` as `nproc` ranks (default: parallelism.world_size, else 2 CPU ranks or every GPU)
    under torch's elastic agent on this node (rendezvous over a local c10d store), restarting the group up to
    `max_restarts` times after a failure that a restart can help (exitcodes.restartable of the root cause); the
    ranks resume from the newest valid checkpoint. Returns the exit status: 0, the root cause's (a failure a restart
    cannot help, or restarts exhausted), or 130/143 when this process got SIGINT/SIGTERM (forwarded to the ranks
    by the agent)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    device_type = preflight(cfg)
    if cfg.checkpoint.every == 0:
        print("tessera: warning: checkpoint.every=0, so a restarted group starts from step 0", file=sys.stderr)
    n = nproc or cfg.parallelism.world_size or (torch.cuda.device_count() if device_type == "cuda" else 2)
    stop = threading.Event()
    threading.Thread(target=_continue_stopped_workers, args=(os.getpid(), stop), daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="tessera-causes-") as causes:
        try:
            agent, failed = _run_agent(n, max_restarts, ["-m", "tessera", "run", "--cause-dir", causes, *argv], causes)
        except SignalException as e:
            status = exitcodes.for_signal(e.sigval)
            print(f"tessera: interrupted by {signal.Signals(e.sigval).name}: the ranks were stopped; exit status "
                  f"{status}. A checkpoint save in flight, if any, was not committed: starting again resumes from "
                  "the newest committed checkpoint", file=sys.stderr, flush=True)
            return status
        finally:
            stop.set()
    if not failed:
        return exitcodes.OK
    used = agent.attempt
    return _report_job(agent.ends, f" in attempt {used + 1} ({used} restart(s) of {max_restarts})")


def _run_agent(nproc: int, max_restarts: int, cmd: list[str], cause_dir: str) -> tuple["_RootCauseAgent", bool]:
    """torch.distributed.run's `--standalone` launch (torch.distributed.launcher.api.launch_agent, which has no
    place to choose the agent) with _RootCauseAgent; returns the agent and whether the group failed (for good).
    Raises torch's SignalException when this process gets SIGINT/SIGTERM (the agent has stopped the ranks)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", str(uuid.uuid4()),
                       "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
                       "--monitor-interval", "0.5", *cmd])
    config, entrypoint, entry_args = config_from_args(args)
    rdzv = RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint, run_id=config.run_id,
                                min_nodes=config.min_nodes, max_nodes=config.max_nodes, local_addr=config.local_addr,
                                **config.rdzv_configs)
    spec = WorkerSpec(role=config.role, local_world_size=config.nproc_per_node, entrypoint=entrypoint,
                      args=tuple(entry_args), rdzv_handler=get_rendezvous_handler(rdzv),
                      max_restarts=config.max_restarts, monitor_interval=config.monitor_interval,
                      master_addr=None, master_port=None, local_addr=config.local_addr)  # c10d: the rdzv has them
    agent = _RootCauseAgent(spec=spec, logs_specs=config.logs_specs, start_method=config.start_method,
                            cause_dir=cause_dir)
    shutdown_rdzv = True
    try:
        result = agent.run()
    except SignalException:
        shutdown_rdzv = False  # as torch's launch_agent: a signalled agent leaves the rendezvous open
        raise
    finally:
        if shutdown_rdzv:
            spec.rdzv_handler.shutdown()
    return agent, result.is_failed()


class _RootCauseAgent(LocalElasticAgent):
    """torch's local elastic agent, except that a failed group whose root cause a restart cannot help (a rank's
    deterministic error, status 1, 2 or 3; see [Note: the root cause decides the job's status]) is not restarted.
    torch restarts after any failure and has no hook to classify one, so this reads the ranks' cause files when the
    agent finds the group failed and, for such a cause, spends the restarts left (`_remaining_restarts`, the counter
    SimpleElasticAgent._invoke_run checks next)."""

    def __init__(self, *args, cause_dir: str, **kw):
        super().__init__(*args, **kw)
        self.cause_dir = cause_dir
        self.ends: list[exitcodes.RankEnd] = []  # how the ranks of the last failed attempt ended
        self.attempt = 0  # that attempt (0: the first)

    def _monitor_workers(self, worker_group):
        result = super()._monitor_workers(worker_group)
        if result.state not in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            return result
        self.attempt = worker_group.spec.max_restarts - self._remaining_restarts  # TORCHELASTIC_RESTART_COUNT
        causes = process.read_causes(os.path.join(self.cause_dir, f"attempt-{self.attempt}"))
        # Ranks still running now are stopped by the agent next: their status says nothing about the job.
        self.ends = [_rank_end(w.global_rank, result.failures[w.global_rank].exitcode
                               if w.global_rank in result.failures else None, causes.get(w.global_rank),
                               by_launcher=w.global_rank not in result.failures)
                     for w in worker_group.workers]
        root = exitcodes.job_status(self.ends)
        if root is not None and not exitcodes.restartable(root.status) and self._remaining_restarts > 0:
            print(f"tessera: rank {root.rank} failed with exit status {root.status} (a restart cannot help): not "
                  f"restarting the group ({self._remaining_restarts} restart(s) left unused)", file=sys.stderr,
                  flush=True)
            self._remaining_restarts = 0
        return result


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
