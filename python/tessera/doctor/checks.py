"""The checks one rank runs. Each returns Result records (never raises: run_check turns an exception into a failed
Result that names the rank, the check and what went wrong).

Figures are "higher is better" and compared across ranks (see bandwidth.stragglers) when Result.compare is set.
Units: TFLOP/s = 1e12 floating-point operations per second, GB/s = 1e9 bytes per second.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from tessera.doctor import bandwidth, memtest

MiB = 1 << 20


@dataclass
class Result:
    """One check on one rank. status: "pass", "fail" or "n/a" (does not apply to this device)."""

    check: str
    status: str
    figure: float | None = None
    unit: str | None = None
    # Whether the figure is compared with the other ranks' (straggler detection): for what is the rank's own (GEMM,
    # host<->device copies, disk writes), not for the group's (collectives) or a correctness check's (memory).
    compare: bool = False
    error: str | None = None
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def run_check(rank: int, name: str, fn, *args) -> list[Result]:
    """fn(*args) -> Result or list of Results; an exception becomes one failed Result naming the rank and check."""
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure of a check fails that check, and the run goes on
        return [Result(name, "fail", error=f"rank {rank}: {name}: {type(e).__name__}: {e}")]
    return out if isinstance(out, list) else [out]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Turns:
    """Who runs a timed round when. On CPU the ranks of a host share its cores and disk: each round runs on one
    rank at a time and the rounds of all ranks interleave (rank 0's first, rank 1's first, ..., rank 0's second),
    so load from outside the job falls on every rank alike instead of on whichever rank's turn it hit. On GPUs
    (each rank's own) and for one rank, a round runs at once (Turns.alone()).

    run() never raises, so that every rank takes part in every barrier whatever fails: a failed round returns inf
    and check() raises the first error after the last round."""

    def __init__(self, rank: int, world: int, barrier=None):
        self.rank, self.world, self.barrier = rank, world, barrier
        self.error: BaseException | None = None

    @classmethod
    def alone(cls) -> "Turns":
        return cls(0, 1)

    def run(self, fn) -> float:
        result = float("inf")
        for turn in range(self.world if self.barrier else 1):
            if self.barrier is None or turn == self.rank:
                if self.error is None:
                    try:
                        result = fn()
                    except Exception as e:  # noqa: BLE001 - kept for check(), after this rank's last barrier
                        self.error = e
            if self.barrier is not None:
                self.barrier()
        return result

    def check(self) -> None:
        if self.error is not None:
            raise self.error


# ---- 1. GEMM ----------------------------------------------------------------------------------------------------

def gemm(device: torch.device, quick: bool, slow: bool = False, turns: Turns | None = None) -> Result:
    """TFLOP/s of C = A @ B with square n x n matrices: 2 n^3 FLOPs per product (n^3 multiply-adds). fp32 on CPU,
    bf16 on GPU. Timed after two warm-up products, in several rounds (7 with --quick, else 5) taken in `turns`; the
    figure is the best round, the one least disturbed by other processes (a slow rank is slow in every round).
    `slow` (fault injection, TESSERA_DOCTOR_SLOW_RANK) sleeps 3x each round's compute time inside the timed
    region, so the figure drops to a quarter."""
    turns = turns or Turns.alone()
    cuda = device.type == "cuda"
    n = (4096 if quick else 8192) if cuda else (512 if quick else 1024)
    iters = 10 if cuda else (4 if quick else 8)
    rounds = 7 if quick else 5
    dtype = torch.bfloat16 if cuda else torch.float32
    state: dict = {}

    def one_round() -> float:
        if not state:  # set up and warm up in this rank's first turn
            state["a"] = torch.randn(n, n, device=device, dtype=dtype)
            state["b"] = torch.randn(n, n, device=device, dtype=dtype)
            for _ in range(2):
                state["c"] = state["a"] @ state["b"]
            _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            state["c"] = state["a"] @ state["b"]
        _sync(device)
        elapsed = time.perf_counter() - t0
        if slow:
            time.sleep(3 * elapsed)
            elapsed = time.perf_counter() - t0
        return elapsed

    best = min(turns.run(one_round) for _ in range(rounds))  # inf where a round failed: turns.check() raises
    turns.check()
    if not torch.isfinite(state["c"]).all():
        raise RuntimeError(f"the {n}x{n} product has non-finite values")
    return Result("gemm", "pass", 2 * n**3 * iters / best / 1e12, "TFLOP/s", compare=True,
                  details={"n": n, "dtype": str(dtype).removeprefix("torch."), "products_per_round": iters,
                           "rounds": rounds, "best_round_s": best, "slowed": slow})


# ---- 2. memory pattern test ---------------------------------------------------------------------------------------

def memory(device: torch.device, quick: bool) -> Result:
    """Memory pattern test (see memtest.py) on a buffer of 256 MiB (--quick: 16 MiB); any mismatching word fails
    the rank. The figure is the rate of pattern writes and reads in GB/s (each pattern writes and reads the buffer
    once), reported but not compared: it is a correctness check."""
    nbytes = (16 if quick else 256) * MiB
    buf = torch.empty(nbytes // memtest.WORD_BYTES, dtype=torch.int64, device=device)
    t0 = time.perf_counter()
    found = memtest.run_patterns(buf, sync=lambda: _sync(device))
    elapsed = time.perf_counter() - t0
    bad = [c for c in found if c.mismatches]
    details = {"bytes": nbytes, "patterns": [asdict(c) for c in found]}
    rate = 2 * nbytes * len(found) / elapsed / 1e9
    if bad:
        c = bad[0]
        return Result("memory", "fail", rate, "GB/s", details=details,
                      error=(f"{sum(x.mismatches for x in bad)} mismatching 64-bit words in {nbytes} bytes on "
                             f"{device}; first: pattern {c.pattern} at byte offset {c.first_bad_offset}: expected "
                             f"{c.expected:#018x}, found {c.found:#018x}"))
    return Result("memory", "pass", rate, "GB/s", details=details)


# ---- 3. host <-> device -------------------------------------------------------------------------------------------

def host_device(device: torch.device, quick: bool) -> list[Result]:
    """Pinned host -> device and device -> host copy bandwidth in GB/s, 64 MiB (--quick) or 256 MiB per copy, mean
    of 5 copies after one warm-up; "n/a" on CPU."""
    if device.type != "cuda":
        return [Result("h2d", "n/a", details={"why": "no device memory on CPU"}),
                Result("d2h", "n/a", details={"why": "no device memory on CPU"})]
    nbytes, iters = (64 if quick else 256) * MiB, 5
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = []
    for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        dst.copy_(src, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src, non_blocking=True)
        _sync(device)
        seconds = time.perf_counter() - t0
        out.append(Result(name, "pass", nbytes * iters / seconds / 1e9, "GB/s", compare=True,
                          details={"bytes": nbytes, "copies": iters, "pinned": True}))
    return out


# ---- 4. collectives -----------------------------------------------------------------------------------------------

def collective_sizes(quick: bool) -> tuple[int, ...]:
    """Full buffer sizes in bytes: 1, 8, 64 MiB; --quick: 256 KiB and 1 MiB."""
    return (256 * 1024, MiB) if quick else (MiB, 8 * MiB, 64 * MiB)


def collectives(device: torch.device, world: int, quick: bool) -> list[Result]:
    """Bus bandwidth (GB/s, nccl-tests' formulas: bandwidth.py) of all_gather, reduce_scatter and all_reduce of fp32
    buffers, through the communicator tessera trains with (tessera.shard.comm: gloo's group on CPU, tessera's NCCL
    communicator on GPU; torch.distributed when this build has no CUDA support). Each size: 2 warm-up calls, a
    barrier, then the mean time of `iters` calls on this rank.

    The figures are reported with their median but not compared across ranks: every rank waits for the slowest
    in each call, so a collective's speed is the group's, and what differs between ranks is only when each left
    the barrier (on a busy 2-core host up to 40% here). A slow link shows as a low busbw for every rank."""
    import torch.distributed as dist

    from tessera.errors import NotSupportedError
    from tessera.shard.comm import communicator

    try:
        comm = communicator(dist.group.WORLD, device)
        via = f"tessera {comm.backend_name}"
        stream = {"stream": torch.cuda.current_stream(device).cuda_stream} if device.type == "cuda" else {}
        ops = {"all_gather": lambda out, inp: comm.all_gather_into(out, inp, **stream),
               "reduce_scatter": lambda out, inp: comm.reduce_scatter_into(out, inp, **stream),
               "all_reduce": lambda out, inp: comm.all_reduce_(inp, **stream)}
        barrier = comm.barrier
    except NotSupportedError:
        via = f"torch.distributed {dist.get_backend()}"
        ops = {"all_gather": lambda out, inp: dist.all_gather_into_tensor(out, inp),
               "reduce_scatter": lambda out, inp: dist.reduce_scatter_tensor(out, inp),
               "all_reduce": lambda out, inp: dist.all_reduce(inp)}
        barrier = dist.barrier
    iters = 5 if quick else 10
    out = []
    for size in collective_sizes(quick):
        count = size // 4 // world * world  # fp32 elements of the full buffer, divisible by the ranks
        nbytes = count * 4
        full = torch.ones(count, device=device)
        part = torch.ones(count // world, device=device)
        for name in bandwidth.COLLECTIVES:
            # all_gather: part -> full; reduce_scatter: full -> part; all_reduce: full in place.
            args = {"all_gather": (full, part), "reduce_scatter": (part, full), "all_reduce": (None, full)}[name]
            for _ in range(2):
                ops[name](*args)
            _sync(device)
            barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                ops[name](*args)
            _sync(device)
            seconds = (time.perf_counter() - t0) / iters
            label = f"{name} {size / MiB:g}MiB"
            out.append(Result(label, "pass", bandwidth.busbw_gbps(name, nbytes, seconds, world), "GB/s busbw",
                              details={"bytes": nbytes, "seconds": seconds, "iters": iters, "via": via,
                                       "algbw_gbps": bandwidth.algbw_gbps(nbytes, seconds)}))
    return out


# ---- 5. checkpoint directory --------------------------------------------------------------------------------------

def checkpoint_dir(directory: str, rank: int, quick: bool, turns: Turns | None = None, repeats: int = 3) -> Result:
    """Write + fsync bandwidth (GB/s) of the checkpoint directory: this rank writes a file of 64 MiB (--quick:
    8 MiB) with os.write in 4 MiB blocks, os.fsync, then removes it; `repeats` times, in `turns`, the figure being
    the best (a disk shared with other work varies from one fsync to the next; a slow disk is slow every time).
    Fails naming the directory if it cannot be written."""
    turns = turns or Turns.alone()
    nbytes, block = (8 if quick else 64) * MiB, 4 * MiB
    data = os.urandom(block)
    best = min(turns.run(lambda: _write_fsync(directory, rank, nbytes, data)) for _ in range(repeats))
    turns.check()
    return Result("checkpoint_write", "pass", nbytes / best / 1e9, "GB/s", compare=True,
                  details={"dir": directory, "bytes": nbytes, "best_s": best, "files": repeats, "fsync": True})


def _write_fsync(directory: str, rank: int, nbytes: int, data: bytes) -> float:
    """Seconds to write `nbytes` (in blocks of `data`) to a new file in `directory` and fsync it; removes it."""
    path = os.path.join(directory, f".tessera-doctor-rank{rank}-{os.getpid()}.tmp")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise OSError(f"checkpoint directory {directory} is not writable: creating {path} failed: "
                      f"{e.strerror or e}") from None
    written = 0
    try:
        t0 = time.perf_counter()
        while written < nbytes:
            written += os.write(fd, data[: min(len(data), nbytes - written)])
        os.fsync(fd)
        return time.perf_counter() - t0
    except OSError as e:
        raise OSError(f"checkpoint directory {directory}: writing {nbytes} bytes to {path} failed after {written} "
                      f"bytes: {e.strerror or e}") from None
    finally:
        os.close(fd)
        os.unlink(path)
