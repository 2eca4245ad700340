"""tessera.optim.AdamW: torch.optim.AdamW's math, run by one fused C++ kernel per contiguous run of shards.

Parameters of a sharded unit are views of one flat shard, and their gradients views of one flat gradient shard.
The optimizer keeps its state (exp_avg, exp_avg_sq) the same way, so consecutive parameters of a unit are updated
by a single kernel call over the flat range they span (padding between them is zero and stays zero). Parameters
that are not tessera shards still work: they get a kernel call each.

[Note: optimizer state dicts] state_dict() is torch's: it hands out the live state tensors (for a unit's
parameters, views into its flat buffers), which later steps update in place exactly where torch's AdamW would
update its own; copy.deepcopy it to keep a snapshot. load_state_dict() checks the dict against the parameters
before changing anything, loads it as torch does (groups with their lr / weight_decay, per-parameter state),
then copies every unit's state into new flat buffers and makes state['exp_avg'] / ['exp_avg_sq'] views of them
again, so the fused step reads what the per-parameter state says. Loading copies: later steps never write into
the dict that was loaded (torch documents a deep copy too). If per-parameter state is replaced by other means,
the next step notices (the tensors are no longer views of the unit's buffers) and adopts it the same way.
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
                flat = self._flat_state[id(unit)] = _new_flat(unit)
            off = unit.shard_offset(index)
            state["exp_avg"] = flat[0][off : off + p.numel()].zero_()  # zero: the range may hold dropped state
            state["exp_avg_sq"] = flat[1][off : off + p.numel()].zero_()
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
                if fusable:
                    flat = self._flat_state.get(id(unit))
                    if flat is None or state["exp_avg"]._base is not flat[0] or \
                            state["exp_avg_sq"]._base is not flat[1]:
                        self._adopt_unit(unit)  # state replaced behind our back: [Note: optimizer state dicts]
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

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict from this class's or torch.optim.AdamW's state_dict() (same parameters, in the same
        groups, on the same shards): per-group hyperparameters (lr, weight_decay, ...) and per-parameter state
        (step, exp_avg, exp_avg_sq), into a fresh optimizer or a live one (rolling back). The dict is copied, never
        kept. Raises InvalidArgumentError naming the parameter for state of the wrong shape or dtype, a missing
        or unknown state entry, or amsgrad / maximize (which this AdamW does not implement), and leaves the
        optimizer unchanged then. See [Note: optimizer state dicts]."""
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._flat_state.clear()  # the old buffers may hold state the loaded dict does not have
        units = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                state["step"] = torch.tensor(float(state["step"]))  # a copy, as _init_state makes it
                unit = managed_by(p)
                if unit is not None and 0 <= unit.param_index(p) < unit.num_trainable:
                    units[id(unit)] = unit
                else:
                    for k in ("exp_avg", "exp_avg_sq"):
                        state[k] = state[k].clone(memory_format=torch.contiguous_format)
        for unit in units.values():
            self._adopt_unit(unit)

    def _check_state_dict(self, sd: dict) -> None:
        """Everything load_state_dict would trip over later, checked before anything changes. Group counts and
        sizes are left to torch's own check (same message as torch's)."""
        saved_groups = sd.get("param_groups") if isinstance(sd, dict) else None
        if not isinstance(saved_groups, list) or not isinstance(sd.get("state"), dict):
            raise InvalidArgumentError("AdamW.load_state_dict: expected a dict with 'state' and 'param_groups' (from "
                                       f"state_dict()), got {type(sd).__name__}")
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            return  # torch raises ValueError for these before changing anything
        for gi, saved in enumerate(saved_groups):
            bad = [k for k in ("amsgrad", "maximize") if saved.get(k)]
            if bad:
                raise InvalidArgumentError(f"AdamW.load_state_dict: param_groups[{gi}] has {bad} set; "
                                           "tessera.optim.AdamW implements neither")
        where = {pid: (gi, pi, p) for gi, (s, g) in enumerate(zip(saved_groups, self.param_groups))
                 for pi, (pid, p) in enumerate(zip(s["params"], g["params"]))}
        for pid, st in sd["state"].items():
            if pid not in where:
                continue  # torch keeps state of unknown ids as it is
            gi, pi, p = where[pid]
            if not st:
                continue
            name = _describe(p, gi, pi)
            keys = set(st) if isinstance(st, dict) else set()
            if keys != {"step", "exp_avg", "exp_avg_sq"}:
                raise InvalidArgumentError(f"AdamW.load_state_dict: state of {name} has entries {sorted(keys)}; "
                                           "expected ['exp_avg', 'exp_avg_sq', 'step']")
            for k in ("exp_avg", "exp_avg_sq"):
                _check_state_tensor(st[k], p, f"state['{k}'] of {name}")
            step = st["step"]
            if not (isinstance(step, torch.Tensor) and step.numel() == 1 or isinstance(step, (int, float))):
                raise InvalidArgumentError(f"AdamW.load_state_dict: state['step'] of {name} is {step!r}; expected a "
                                           "number or a one-element tensor")

    def _adopt_unit(self, unit) -> None:
        """Copies the per-parameter state of `unit`'s parameters into new flat buffers and makes it views of them
        (see [Note: optimizer state dicts]). Parameters without state get zeros. Checks every tensor first."""
        held = []
        for i in range(unit.num_trainable):
            p = unit.params[i].sharded
            state = self.state.get(p)
            if state:
                for k in ("exp_avg", "exp_avg_sq"):
                    _check_state_tensor(state.get(k), p, f"state['{k}'] of {_describe(p)}")
                held.append((i, p, state))
        m, v = _new_flat(unit)
        for i, p, state in held:
            off = unit.shard_offset(i)
            for k, buf in (("exp_avg", m), ("exp_avg_sq", v)):
                view = buf[off : off + p.numel()].view_as(p)
                view.copy_(state[k])
                state[k] = view
        self._flat_state[id(unit)] = (m, v)

    def _step_run(self, run, hyper) -> None:
        unit, first, last, step = run
        fences.wait_for_unit(unit)  # only this unit's pieces must be staged: [Note: checkpoint consistency]
        start = unit.shard_offset(first)
        end = unit.shard_offset(last + 1) if last + 1 < unit.num_trainable else unit.trainable_shard_numel
        m, v = self._flat_state[id(unit)]
        _C.adamw_step(unit.flat_shard[start:end], unit.flat_grad_shard[start:end], m[start:end], v[start:end],
                      *hyper, step, unit.stream)


def _new_flat(unit) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (exp_avg, exp_avg_sq) flat buffers for a unit's trainable prefix, like its flat shard."""
    like = unit.flat_shard
    n = unit.trainable_shard_numel
    return (torch.zeros(n, dtype=like.dtype, device=like.device),
            torch.zeros(n, dtype=like.dtype, device=like.device))


def _describe(p: torch.Tensor, gi: int | None = None, pi: int | None = None) -> str:
    """A parameter's name for messages: its position in the param groups and, for a shard, its unit and name."""
    where = f"param_groups[{gi}]['params'][{pi}]" if gi is not None else "a parameter"
    unit = managed_by(p)
    index = unit.param_index(p) if unit is not None else -1
    if index >= 0:
        where += f" ('{unit.params[index].name}' of unit {unit.name})"
    return f"{where} (shape {tuple(p.shape)}, {p.dtype})"


def _check_state_tensor(t, p: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"AdamW: {what} is a {type(t).__name__}; expected a tensor")
    if t.shape != p.shape:
        raise InvalidArgumentError(f"AdamW: {what} has shape {tuple(t.shape)}; expected the parameter's "
                                   f"{tuple(p.shape)} (a state dict from other shards? load it with "
                                   "tessera.checkpoint.Checkpointer, which reshards)")
    if not t.is_floating_point():
        raise InvalidArgumentError(f"AdamW: {what} has dtype {t.dtype}; expected a floating-point dtype")


def _stream(p: torch.Tensor) -> int:
    return torch.cuda.current_stream(p.device).cuda_stream if p.device.type == "cuda" else 0
