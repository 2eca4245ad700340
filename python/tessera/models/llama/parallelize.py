"""Applies tessera sharding to a Llama in a fixed order: each transformer block, then the root."""

from __future__ import annotations

import tessera
from tessera.models.llama.model import Llama


def parallelize(model: Llama, *, group=None, strategy=None, mixed_precision=None) -> Llama:
    strategy = strategy or tessera.ShardingStrategy.FULL_SHARD
    for block in model.layers:
        tessera.shard(block, group=group, strategy=strategy, mixed_precision=mixed_precision)
    tessera.shard(model, group=group, strategy=strategy, mixed_precision=mixed_precision)
    return model
