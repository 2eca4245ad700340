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
    compare: bool = False  # whether the figure is compared with the other ranks' (straggler detection)
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


# ---- 1. GEMM ----------------------------------------------------------------------------------------------------

def gemm(device: torch.device, quick: bool, slow: bool = False) -> Result:
    """TFLOP/s of C = A @ B with square n x n matrices: 2 n^3 FLOPs per product (n^3 multiply-adds). fp32 on CPU,
    bf16 on GPU. Timed after two warm-up products, in 3 rounds; the figure is the best round (the least disturbed
    by other processes). `slow` (fault injection, TESSERA_DOCTOR_SLOW_RANK) sleeps 3x each round's compute time
    inside the timed region, so the figure drops to a quarter."""
    cuda = device.type == "cuda"
    n = (4096 if quick else 8192) if cuda else (384 if quick else 1024)
    iters = 10 if cuda else (4 if quick else 8)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        c = a @ b
    _sync(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            c = a @ b
        _sync(device)
        elapsed = time.perf_counter() - t0
        if slow:
            time.sleep(3 * elapsed)
            elapsed = time.perf_counter() - t0
        best = min(best, elapsed)
    if not torch.isfinite(c).all():
        raise RuntimeError(f"the {n}x{n} product has non-finite values")
    return Result("gemm", "pass", 2 * n**3 * iters / best / 1e12, "TFLOP/s", compare=True,
                  details={"n": n, "dtype": str(dtype).removeprefix("torch."), "products_per_round": iters,
                           "best_round_s": best, "slowed": slow})


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
    barrier, then the mean time of `iters` calls on this rank."""
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
                              compare=True,
                              details={"bytes": nbytes, "seconds": seconds, "iters": iters, "via": via,
                                       "algbw_gbps": bandwidth.algbw_gbps(nbytes, seconds)}))
    return out


# ---- 5. checkpoint directory --------------------------------------------------------------------------------------

def checkpoint_dir(directory: str, rank: int, quick: bool) -> Result:
    """Write + fsync bandwidth (GB/s) of the checkpoint directory: this rank writes a file of 64 MiB (--quick:
    8 MiB) with os.write in 4 MiB blocks, os.fsync, then removes it. Fails naming the directory if it cannot be
    written."""
    nbytes, block = (8 if quick else 64) * MiB, 4 * MiB
    path = os.path.join(directory, f".tessera-doctor-rank{rank}-{os.getpid()}.tmp")
    data = os.urandom(block)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise OSError(f"checkpoint directory {directory} is not writable: creating {path} failed: "
                      f"{e.strerror or e}") from None
    try:
        t0 = time.perf_counter()
        written = 0
        while written < nbytes:
            written += os.write(fd, data[: min(block, nbytes - written)])
        os.fsync(fd)
        seconds = time.perf_counter() - t0
    except OSError as e:
        raise OSError(f"checkpoint directory {directory}: writing {nbytes} bytes to {path} failed after {written} "
                      f"bytes: {e.strerror or e}") from None
    finally:
        os.close(fd)
        os.unlink(path)
    return Result("checkpoint_write", "pass", nbytes / seconds / 1e9, "GB/s", compare=True,
                  details={"dir": directory, "bytes": nbytes, "seconds": seconds, "fsync": True})
