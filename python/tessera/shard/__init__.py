"""Sharding: tessera.shard(), strategies, mixed precision, state dicts and clipping."""
