"""Optimizers that step on tessera's local shards with fused C++/CUDA kernels."""

from tessera.optim.adamw import AdamW

__all__ = ["AdamW"]
