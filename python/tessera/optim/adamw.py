"""tessera.optim.AdamW: torch.optim.AdamW's math, run by one fused C++ kernel per contiguous run of shards.

Parameters of a sharded unit are views of one flat shard, and their gradients views of one flat gradient shard.
The optimizer keeps its state (exp_avg, exp_avg_sq) the same way, so consecutive parameters of a unit are updated
by a single kernel call over the flat range they span (padding between them is zero and stays zero). Parameters
that are not tessera shards still work: they get a kernel call each.
"""

from __future__ import annotations

import torch

from tessera import _C
from tessera.errors import InvalidArgumentError
from tessera.shard import fences
from tessera.shard.runtime import managed_by


class AdamW(torch.optim.Optimizer):
    # It waits for staging per unit itself (see [Note: checkpoint consistency] in tessera/shard/fences.py).
    fences_per_unit = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if not 0.0 <= lr:
            raise InvalidArgumentError(f"AdamW: lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise InvalidArgumentError(f"AdamW: eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise InvalidArgumentError(f"AdamW: betas must be in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise InvalidArgumentError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._flat_state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(unit runtime) -> (m, v)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if state:
            return state
        unit = managed_by(p)
        index = unit.param_index(p) if unit is not None else -1
        if index >= 0 and index < unit.num_trainable:
            flat = self._flat_state.get(id(unit))
            if flat is None:
                n = unit.trainable_shard_numel
                like = unit.flat_shard
                flat = (torch.zeros(n, dtype=like.dtype, device=like.device),
                        torch.zeros(n, dtype=like.dtype, device=like.device))
                self._flat_state[id(unit)] = flat
            off = unit.shard_offset(index)
            state["exp_avg"] = flat[0][off : off + p.numel()]
            state["exp_avg_sq"] = flat[1][off : off + p.numel()]
        else:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["step"] = torch.tensor(0.0)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            run = None  # [unit, first index, last index, step]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise InvalidArgumentError("AdamW does not support sparse gradients")
                state = self._init_state(p)
                state["step"] += 1
                step = int(state["step"].item())
                unit = managed_by(p)
                index = unit.param_index(p) if unit is not None else -1
                fusable = index >= 0 and index < unit.num_trainable and p.grad is unit.grad_views[index]
                if fusable and run is not None and run[0] is unit and run[2] == index - 1 and run[3] == step:
                    run[2] = index
                    continue
                if run is not None:
                    self._step_run(run, hyper)
                    run = None
                if fusable:
                    run = [unit, index, index, step]
                else:
                    fences.wait_all()  # see [Note: checkpoint consistency] in tessera/shard/fences.py
                    _C.adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], *hyper, step,
                                  _stream(p))
            if run is not None:
                self._step_run(run, hyper)
        return loss

    def _step_run(self, run, hyper) -> None:
        unit, first, last, step = run
        fences.wait_for_unit(unit)  # only this unit's pieces must be staged: [Note: checkpoint consistency]
        start = unit.shard_offset(first)
        end = unit.shard_offset(last + 1) if last + 1 < unit.num_trainable else unit.trainable_shard_numel
        m, v = self._flat_state[id(unit)]
        _C.adamw_step(unit.flat_shard[start:end], unit.flat_grad_shard[start:end], m[start:end], v[start:end],
                      *hyper, step, unit.stream)


def _stream(p: torch.Tensor) -> int:
    return torch.cuda.current_stream(p.device).cuda_stream if p.device.type == "cuda" else 0
