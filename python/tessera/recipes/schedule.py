"""The learning-rate schedule: linear warmup, then cosine decay (Loshchilov & Hutter 2017, SGDR without restarts),
as torchtitan's and transformers' get_cosine_schedule_with_warmup do, with a floor of lr * min_lr_ratio.

The LR is a pure function of the step, so a resumed job gets exactly the LR of an uninterrupted one from the step
counter alone (the checkpoint keeps the step; there is no scheduler object to drift)."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR for optimizer step `step` (1-based): lr * step / warmup_steps while step <= warmup_steps, then
    min + (lr - min) * (1 + cos(pi * progress)) / 2 with progress = (step - warmup) / (total - warmup) in (0, 1]
    and min = lr * min_lr_ratio, so the last step runs at the floor."""
    if step <= warmup_steps:
        return lr * step / warmup_steps
    floor = lr * min_lr_ratio
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
