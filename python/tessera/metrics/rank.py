"""Which rank keeps the run's record and console: rank 0 of the default group, or the only process."""

from __future__ import annotations

import torch.distributed as dist


def is_rank0() -> bool:
    """True outside torch.distributed (one process) and on rank 0 of the initialised default group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
