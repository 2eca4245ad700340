"""Public option types of tessera.shard. Imports nothing of tessera but its errors, so every layer may use them."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from tessera.errors import InvalidArgumentError


class ShardingStrategy(enum.Enum):
    FULL_SHARD = "full_shard"  # ZeRO-3: parameters, gradients, optimizer state sharded; params freed after forward
    SHARD_GRAD_OP = "shard_grad_op"  # ZeRO-2: params kept unsharded from forward until after backward
    NO_SHARD = "no_shard"  # DDP-like: replicated parameters, all-reduced gradients
    HYBRID_SHARD = "hybrid_shard"  # shard within a node, replicate across nodes (not yet supported)


@dataclass(frozen=True, kw_only=True)
class MixedPrecision:
    """param_dtype: dtype the module computes with (the shard keeps full precision); reduce_dtype: dtype
    gradients are reduced in (default: param_dtype)."""

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None

    def __post_init__(self):
        allowed = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        for field in ("param_dtype", "reduce_dtype"):
            value = getattr(self, field)
            if value is not None and value not in allowed:
                raise InvalidArgumentError(
                    f"MixedPrecision.{field}={value} is not supported; expected one of {allowed} or None"
                )
