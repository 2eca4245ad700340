"""The glue between torch's module and autograd hooks and tessera's step schedule (DESIGN.md section 3).

The C++ `_C.StepSchedule` (csrc/tessera/shard/schedule.h) owns the step: each unit's TrainingState, the order units
run in, prefetching, when to reduce, the end of backward, gradient accumulation into the sharded gradients, and the
clean-up after a backward that raised. The C++ `_C.Unit` does the work (all-gather + copy-out, copy-in +
reduce-scatter). This file only reports events and moves tensors in and out of modules:

  pre-forward    schedule.pre_forward, then put the unsharded parameters on the module and wrap the inputs so that
                 post-backward runs once gradients flowed through the whole unit.
  post-forward   schedule.post_forward, then put the sharded parameters back and hook the outputs' gradients.
  pre-backward   schedule.pre_backward (the first one of a pass queues end-of-backward on the autograd engine), then
                 the unsharded parameters again (a checkpointing recomputation may run the forward).
  post-backward  schedule.post_backward, then the sharded parameters.
  end of backward  schedule.end_of_backward: every reduction finished and accumulated, so the optimizer steps on
                 local shards.

See [Note: activation checkpointing] and [Note: every backward pass reduces] in schedule.h / schedule.cc.
"""

from __future__ import annotations

import weakref
from time import perf_counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._pytree import tree_flatten, tree_unflatten

from tessera import _C
from tessera.shard import waits
from tessera.shard.types import ShardingStrategy

_UNIT_ATTR = "_tessera_unit"
# On each parameter tensor: a weak reference to the unit managing it. Weak, because the C++ unit holds the
# parameters themselves (see _C.Unit.adopt_params): a strong one would make a cycle through C++ that the garbage
# collector cannot see, and a dropped model would never be freed.
_PARAM_ATTR = "_tessera_unit_ref"
# On each original parameter that tessera.shard replaced: its name in the unit (an optimizer built before sharding
# still holds it; tessera/shard/guards.py names it in the error).
REPLACED_NAME_ATTR = "_tessera_replaced_name"


def _in_backward() -> bool:
    """Whether autograd is running a backward on this thread (a forward now is a checkpointing recomputation)."""
    return torch._C._current_graph_task_id() != -1


def unit_of(module: nn.Module) -> "UnitRuntime | None":
    return module.__dict__.get(_UNIT_ATTR)


def managed_by(tensor: torch.Tensor) -> "UnitRuntime | None":
    ref = getattr(tensor, _PARAM_ATTR, None)
    return ref() if ref is not None else None


@dataclass
class ParamInfo:
    name: str  # the first name under the unit's module (tied parameters have several locations)
    tensor: torch.Tensor | None  # the original parameter, until the unit is installed
    requires_grad: bool
    locations: list[tuple[nn.Module, str]] = field(default_factory=list)
    sharded: nn.Parameter | None = None  # this rank's local shard (1-D), what module.parameters() yields
    full: nn.Parameter | None = None  # the unsharded parameter the module computes with


class _Root:
    """The root unit's schedule and the units under it (root first, then module order)."""

    def __init__(self, root: "UnitRuntime"):
        self.units: list[UnitRuntime] = [root]
        for path, mod in root.module.named_modules():
            unit = unit_of(mod)
            if unit is not None and unit is not root:
                self.units.append(unit)
                unit.name = unit.unit.name = f"{path} ({type(mod).__name__})"  # errors name the module path
        for i, unit in enumerate(self.units):
            unit.root, unit.index = self, i
        self.schedule = _C.StepSchedule(
            [u.unit for u in self.units],
            reshard_after_forward=[u.explicit_reshard for u in self.units],
            default_reshard_after_forward=[u.default_reshard for u in self.units],
        )
        self._end = self.end_of_backward  # one bound method, queued once per backward pass

    def end_of_backward(self) -> None:
        t0 = perf_counter()
        for i in self.schedule.end_of_backward(self.units[0].stream):
            self.units[i]._use(sharded=True)
        waits.add(perf_counter() - t0)


class _PostBackward(torch.autograd.Function):
    """Identity on a unit's inputs whose backward runs once gradients flowed through the whole unit."""

    @staticmethod
    def forward(ctx, runtime, *inputs):
        ctx.runtime = runtime
        return inputs

    @staticmethod
    def backward(ctx, *grads):
        ctx.runtime.post_backward()
        return (None,) + grads


class UnitRuntime:
    """One sharded module. Its public surface (used by the optimizer, clipping, state dicts and checkpointing):
    `params` (ParamInfo per parameter, layout order: trainable first), `num_trainable`, `stream`, `flat_shard`,
    `flat_grad_shard`, `grad_views`, `trainable_shard_numel`, `shard_offset(i)`, `owned_range(i)`, `save_range(i)`,
    `param_index(p)`,
    `sharded`, `group_rank`, `group_size`, `gather_full()`, `load_full_param(i, t)`."""

    def __init__(self, *, module, params, comm, strategy, param_dtype, reduce_dtype, reshard_after_forward,
                 timeout_s):
        self.module = module
        self.params: list[ParamInfo] = params
        # Only the communicator, never the ProcessGroup: torch.distributed owns its groups (see [Note: the adapter
        # does not own the group] in csrc/tessera/comm/pg/pg_communicator.h).
        self.comm = comm
        self.strategy = strategy
        self.name = type(module).__name__
        self.num_trainable = sum(1 for p in params if p.requires_grad)
        self.sharded = strategy is not ShardingStrategy.NO_SHARD
        self.explicit_reshard: bool | None = reshard_after_forward
        self.default_reshard = strategy is ShardingStrategy.FULL_SHARD
        self.device = params[0].tensor.device
        self._cuda = self.device.type == "cuda"
        self.unit = _C.Unit(
            comm,
            [p.tensor.detach() for p in params],
            [p.name for p in params],
            self.num_trainable,
            name=self.name,
            shard=self.sharded,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            timeout_s=timeout_s,
        )
        self.root: _Root | None = None
        self.index = -1  # position in the root's schedule

    # ---- installation ----------------------------------------------------------------------------------------

    def install(self) -> None:
        sharded = self.unit.sharded_params
        full = self.unit.full_params
        self.grad_views = list(self.unit.sharded_grads)
        ref = weakref.ref(self)
        for i, info in enumerate(self.params):
            info.sharded = nn.Parameter(sharded[i], requires_grad=info.requires_grad)
            info.full = nn.Parameter(full[i], requires_grad=info.requires_grad)
            for t in (info.tensor, info.sharded, info.full):
                setattr(t, _PARAM_ATTR, ref)
            setattr(info.tensor, REPLACED_NAME_ATTR, info.name)
            info.tensor = None  # drop the original so its memory can go
        self.unit.adopt_params([i.sharded for i in self.params], [i.full for i in self.params])
        self._index_of = {id(info.sharded): i for i, info in enumerate(self.params)}
        self._use(sharded=True)
        self.module.__dict__[_UNIT_ATTR] = self
        self.module.register_forward_pre_hook(self._pre_forward, prepend=True, with_kwargs=True)
        self.module.register_forward_hook(self._post_forward, always_call=False, with_kwargs=True)

    def _use(self, *, sharded: bool) -> None:
        for info in self.params:
            tensor = info.sharded if sharded else info.full
            for mod, attr in info.locations:
                mod._parameters[attr] = tensor

    # ---- public surface --------------------------------------------------------------------------------------

    @property
    def stream(self) -> int:
        """The cudaStream_t (as an int) tessera's work on this unit follows: the current stream; 0 on CPU."""
        return torch.cuda.current_stream(self.device).cuda_stream if self._cuda else 0

    @property
    def flat_shard(self) -> torch.Tensor:
        """This rank's flat shard, 1-D [shard_numel], the parameters' storage dtype (padding included)."""
        return self.unit.flat_shard

    @property
    def flat_grad_shard(self) -> torch.Tensor:
        """The flat gradient shard of the trainable prefix, 1-D [trainable_shard_numel]."""
        return self.unit.flat_grad_shard

    @property
    def trainable_shard_numel(self) -> int:
        return self.unit.trainable_shard_numel

    @property
    def group_rank(self) -> int:
        return self.unit.group_rank

    @property
    def group_size(self) -> int:
        return self.unit.group_size

    @property
    def requires_grad_sync(self) -> bool:
        return self.unit.requires_grad_sync

    @requires_grad_sync.setter
    def requires_grad_sync(self, on: bool) -> None:
        self.unit.requires_grad_sync = bool(on)

    def shard_offset(self, i: int) -> int:
        """Where parameter i's chunk starts in the flat shard (elements)."""
        return self.unit.shard_offset(i)

    def owned_range(self, i: int) -> tuple[int, int]:
        """(start, count): the elements of parameter i, flattened, that this rank owns (from the C++ ShardPlan)."""
        return self.unit.owned_range(i)

    def save_range(self, i: int) -> tuple[int, int]:
        """(start, count): the elements of parameter i this rank writes into a checkpoint (owned_range when
        sharded; a 1/group_size chunk of the replicated tensor under NO_SHARD)."""
        return self.unit.save_range(i)

    def param_index(self, p: torch.Tensor) -> int:
        """Layout index of sharded parameter `p` in this unit, -1 if it is not one (a dict: the optimizer asks
        for every parameter on every step)."""
        return self._index_of.get(id(p), -1)

    def gather_full(self) -> list[torch.Tensor]:
        """Every parameter at its full shape, in the shard's dtype (collective: every rank of the group calls it)."""
        return self.unit.gather_full()

    def load_full_param(self, i: int, full: torch.Tensor) -> None:
        """Copies this rank's part of full tensor `full` (parameter i's shape) into the shard."""
        self.unit.load_full_param(i, full)

    # ---- hooks -----------------------------------------------------------------------------------------------

    def _pre_forward(self, module, args, kwargs):
        root = self.root if self.root is not None else _Root(self)  # the first unit to run forward is the root
        t0 = perf_counter()
        recompute, abandoned = root.schedule.pre_forward(self.index, _in_backward(), self.stream)
        waits.add(perf_counter() - t0)
        if abandoned:
            for unit in root.units:
                unit._use(sharded=True)
        self._use(sharded=False)
        if recompute or not torch.is_grad_enabled():
            return args, kwargs
        flat, spec = tree_flatten((args, kwargs))
        idx = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
        if idx:
            outs = _PostBackward.apply(self, *[flat[i] for i in idx])
            for i, t in zip(idx, outs):
                flat[i] = t
            args, kwargs = tree_unflatten(flat, spec)
        return args, kwargs

    def _post_forward(self, module, args, kwargs, output):
        grad = torch.is_grad_enabled()
        if not self.root.schedule.post_forward(self.index, grad, _in_backward()):
            return output  # see [Note: activation checkpointing]
        self._use(sharded=True)
        if grad:
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if tensors:
                register_multi_grad_hook(tensors, self._pre_backward, mode="any")
        return output

    def _pre_backward(self, _grad) -> None:
        root = self.root
        t0 = perf_counter()
        if root.schedule.pre_backward(self.index, self.stream):
            torch.autograd.Variable._execution_engine.queue_callback(root._end)
        waits.add(perf_counter() - t0)
        # Backward may run this unit's forward again (activation checkpointing around the unit): the recomputation
        # must see the full parameters, as FSDP2 does; post_backward swaps the shards back in.
        self._use(sharded=False)

    def post_backward(self) -> None:
        t0 = perf_counter()
        self.root.schedule.post_backward(self.index, self.stream)
        waits.add(perf_counter() - t0)
        self._use(sharded=True)
