"""Applies tessera sharding to a Llama (or Mistral) in a fixed order: each transformer block, then the root."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

import tessera
from tessera.models.llama.model import Llama


def parallelize(model: Llama, *, group=None, strategy=None, mixed_precision=None,
                before_shard: Callable[[nn.Module], None] | None = None) -> Llama:
    """Shards each block, then the root (embeddings, final norm, head). `before_shard(module)` runs just before
    each tessera.shard call: load_hf uses it to fill a meta-device model one unit at a time."""
    strategy = strategy or tessera.ShardingStrategy.FULL_SHARD
    for block in model.layers:
        if before_shard is not None:
            before_shard(block)
        tessera.shard(block, group=group, strategy=strategy, mixed_precision=mixed_precision)
    if before_shard is not None:
        before_shard(model)
    tessera.shard(model, group=group, strategy=strategy, mixed_precision=mixed_precision)
    return model
