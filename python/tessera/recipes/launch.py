"""Starting a job's ranks: under torchrun, this process is one rank; otherwise `tessera run` starts
parallelism.world_size processes itself (CPU: gloo, one process per rank; CUDA: NCCL, one process per GPU).

Device "auto" picks CUDA when a GPU is visible (NCCL, bf16 compute with fp32 master weights and fp32 gradient
reduction) and the CPU otherwise (gloo, fp32)."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tessera
from tessera import knobs
from tessera.errors import InvalidArgumentError, TesseraError
from tessera.process import end_spawned_rank
from tessera.recipes.config import JobConfig


def resolve_device(cfg: JobConfig) -> str:
    want = cfg.parallelism.device
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("parallelism.device=cuda but no CUDA device is visible")
    return want


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
    if init_file:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world, **kw)
    else:  # torchrun: rank and world size from its environment
        dist.init_process_group(backend, **kw)
    if device_type == "cpu":  # the machine's cores shared by the ranks on it (all of them, without torchrun)
        local = knobs.torchrun_local_world_size() if not init_file else world
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    try:
        return train(cfg, device=device, mixed_precision=mixed_precision(cfg, device_type))
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, device_type: str, init_file: str, cfg: JobConfig) -> None:
    try:
        _rank_main(rank, world, device_type, init_file, cfg)
    except TesseraError as e:
        print(f"tessera: error (rank {rank}): {e}", file=sys.stderr, flush=True)
        end_spawned_rank(2)
    except BaseException:  # noqa: BLE001 - report and end this rank; the others fail their next collective
        traceback.print_exc()
        end_spawned_rank(1)
    end_spawned_rank()  # see [Note: ending spawned rank processes] in tessera/process.py


def run(cfg: JobConfig) -> int:
    """Runs the job; returns the process exit status (0 on success). Raises InvalidArgumentError for what can be
    checked before ranks start (device, model directory, data source)."""
    from tessera.recipes import build, data_sources

    device_type = resolve_device(cfg)
    data_sources.check_source(cfg)
    build.model_dir(cfg)  # fetches once here, before the ranks start
    if knobs.launched_by_torchrun():
        _rank_main(0, 0, device_type, None, cfg)  # rank and world come from torchrun
        return 0
    world = cfg.parallelism.world_size or (torch.cuda.device_count() if device_type == "cuda" else 2)
    if device_type == "cuda" and world > torch.cuda.device_count():
        raise InvalidArgumentError(f"parallelism.world_size={world} but only {torch.cuda.device_count()} GPU(s) "
                                   "are visible")
    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_spawned, args=(world, device_type, os.path.join(d, "init"), cfg), nprocs=world, join=True)
        except mp.ProcessExitedException as e:
            print(f"tessera: rank {e.error_index} exited with status {e.exit_code}", file=sys.stderr)
            return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    return 0
