"""tessera: a distributed training runtime for PyTorch with a C++/CUDA core.

    import tessera
    for block in model.layers:
        tessera.shard(block)
    tessera.shard(model)
    opt = tessera.optim.AdamW(model.parameters(), lr=3e-4)
"""

import torch  # noqa: F401  (loads libtorch before the C++ core that links it)

from tessera import _C  # noqa: F401  (the C++ core; fails early if the build is missing)
from tessera import checkpoint, optim, process
from tessera.errors import (
    CheckpointError,
    CommError,
    CommTimeoutError,
    DesyncError,
    FetchError,
    InvalidArgumentError,
    NotSupportedError,
    StateError,
    TesseraError,
)
# `tessera.shard` is the package tessera/shard, callable as tessera.shard(module, ...) (see its __init__.py).
from tessera import shard
from tessera.shard.api import set_requires_gradient_sync
from tessera.shard.comm import set_step, set_timeouts
from tessera.shard.types import MixedPrecision, ShardingStrategy
from tessera.shard.clip import clip_grad_norm_
from tessera.shard.state_dict import full_state_dict, load_full_state_dict
from tessera import models  # noqa: E402  (Llama/Mistral, load_hf/save_hf; after shard, which parallelize uses)
from tessera import peft  # noqa: E402  (LoRA on the models above)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CommError",
    "CommTimeoutError",
    "DesyncError",
    "FetchError",
    "InvalidArgumentError",
    "MixedPrecision",
    "NotSupportedError",
    "ShardingStrategy",
    "StateError",
    "TesseraError",
    "checkpoint",
    "clip_grad_norm_",
    "full_state_dict",
    "load_full_state_dict",
    "optim",
    "peft",
    "process",
    "set_requires_gradient_sync",
    "set_step",
    "set_timeouts",
    "shard",
]
