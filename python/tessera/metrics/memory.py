"""Peak memory of a training process, per device type."""

from __future__ import annotations

import resource
import sys

import torch

from tessera.errors import NotSupportedError


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory in bytes since the process started (or since torch.cuda.reset_peak_memory_stats, on CUDA).

    - cuda: torch.cuda.max_memory_allocated(device): bytes of tensors allocated by the caching allocator at the
      peak; excludes the allocator's cached-but-free blocks and the CUDA context (so below nvidia-smi's figure).
    - cpu: the peak resident set size of this process (getrusage(RUSAGE_SELF).ru_maxrss, which Linux reports in KiB
      and macOS in bytes; Linux's /proc/self/status calls it VmHWM). It counts everything the process holds,
      the Python interpreter and torch's libraries included, not only tensors, and never goes down: CPU tensors
      come from malloc, which keeps no peak of its own.
    Raises NotSupportedError for other device types (mps, xpu, meta, ...).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "cpu":
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(maxrss if sys.platform == "darwin" else maxrss * 1024)
    raise NotSupportedError(f"peak_memory_bytes: device {device} is not supported (expected a cuda or cpu device)")
