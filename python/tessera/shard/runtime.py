"""The hooks that drive a sharded unit through one training step (DESIGN.md section 3).

The C++ `_C.Unit` does the work (all-gather + copy-out, copy-in + reduce-scatter); this file decides when:

  pre-forward    wait for this unit's all-gather (issued earlier as a prefetch, or now), swap the unsharded
                 parameters into the module, prefetch the next unit's all-gather.
  post-forward   swap the sharded parameters back; free the unsharded storage (FULL_SHARD, non-root).
  pre-backward   (first gradient reaching the unit's outputs) all-gather again; prefetch the previous unit.
  post-backward  (gradient reaching the unit's inputs, or the end of backward) copy-in + reduce-scatter the
                 gradients, free the unsharded parameters.
  end of backward (a callback queued on the autograd engine) wait for every reduce-scatter and accumulate the
                 results into the sharded gradients, so the optimizer steps on local shards.

[Note: activation checkpointing] Checkpointing runs a unit's forward again inside backward. Non-reentrant
checkpointing does it after the unit's pre-backward hook ran: the parameters are gathered already, and post-backward
will reduce and reshard, so the recomputed forward only puts the full parameters on the module (FSDP2 does the same).
Reentrant checkpointing ran the first forward without grad, so its recomputation takes the normal path but neither
prefetches the next unit (whose backward is over) nor reshards (this unit's backward follows at once).

[Note: root unit] The outermost unit whose forward runs first is the root. It records the order units run in
(used for prefetching), queues the end-of-backward callback, and keeps its own parameters unsharded between
forward and backward, since its backward starts right after its forward ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._pytree import tree_flatten, tree_unflatten

from tessera import _C

_UNIT_ATTR = "_tessera_unit"
_PARAM_ATTR = "_tessera_unit"


def _in_backward() -> bool:
    """Whether autograd is running a backward on this thread (a forward now is a checkpointing recomputation)."""
    return torch._C._current_graph_task_id() != -1


def unit_of(module: nn.Module) -> "UnitRuntime | None":
    return module.__dict__.get(_UNIT_ATTR)


def managed_by(tensor: torch.Tensor) -> "UnitRuntime | None":
    return getattr(tensor, _PARAM_ATTR, None)


@dataclass
class ParamInfo:
    name: str  # the first name under the unit's module (tied parameters have several locations)
    tensor: torch.Tensor  # the original parameter, until the unit is installed
    requires_grad: bool
    locations: list[tuple[nn.Module, str]] = field(default_factory=list)
    sharded: nn.Parameter | None = None  # this rank's local shard (1-D), what module.parameters() yields
    full: nn.Parameter | None = None  # the unsharded parameter the module computes with


class _RootState:
    """Per-root bookkeeping of one iteration: unit order and whether a backward is running."""

    def __init__(self, root: "UnitRuntime"):
        self.root = root
        self.units: list[UnitRuntime] = []
        self.forward_order: list[UnitRuntime] = []
        self.order_recorded = False
        self.in_backward = False

    def abandon_backward(self) -> None:
        """A backward raised before its end (the end-of-backward callback never ran): drop what it left behind (its
        reductions, partial gradients, gathered parameters) so the next backward starts clean. Called from the next
        forward. A failure on some ranks only leaves the others blocked in a collective: they time out
        (CommTimeoutError) like any group with a rank that stopped."""
        for unit in self.units:
            if unit.unit.reducing:
                unit.unit.wait_reduce(unit._stream())  # its result is dropped: the gradients are incomplete
            for info in unit.params:
                info.full.grad = None
            unit._use(sharded=True)
            unit.reshard()
            unit._in_pre_backward = unit._post_backward_done = unit._ran_forward = False
        self.in_backward = False


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
    def __init__(self, *, module, params, comm, strategy, param_dtype, reduce_dtype, reshard_after_forward,
                 timeout_s):
        from tessera.shard.api import ShardingStrategy  # local: api imports this module

        self.module = module
        self.params: list[ParamInfo] = params
        # Only the communicator, never the ProcessGroup: torch.distributed owns its groups (see [Note: the adapter
        # does not own the group] in csrc/tessera/comm/pg/pg_communicator.h).
        self.comm = comm
        self.strategy = strategy
        self.name = type(module).__name__
        self.num_trainable = sum(1 for p in params if p.requires_grad)
        self.sharded = strategy is not ShardingStrategy.NO_SHARD
        self._explicit_reshard = reshard_after_forward
        self.reshard_after_forward = (
            reshard_after_forward if reshard_after_forward is not None else strategy is ShardingStrategy.FULL_SHARD
        )
        self.requires_grad_sync = True
        self.device = params[0].tensor.device
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
        self.root_state: _RootState | None = None
        self._post_backward_done = False
        self._ran_forward = False
        self._in_pre_backward = False  # between this unit's pre-backward and post-backward

    # ---- installation ----------------------------------------------------------------------------------------

    def install(self) -> None:
        sharded = self.unit.sharded_params
        full = self.unit.full_params
        self.grad_views = list(self.unit.sharded_grads)
        for i, info in enumerate(self.params):
            info.sharded = nn.Parameter(sharded[i], requires_grad=info.requires_grad)
            info.full = nn.Parameter(full[i], requires_grad=info.requires_grad)
            for t in (info.tensor, info.sharded, info.full):
                setattr(t, _PARAM_ATTR, self)
            info.tensor = None  # drop the original so its memory can go
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

    def param_index(self, p: torch.Tensor) -> int:
        """Layout index of sharded parameter `p` in this unit, -1 if it is not one (a dict: the optimizer asks
        for every parameter on every step)."""
        return self._index_of.get(id(p), -1)

    # ---- unshard / reshard -----------------------------------------------------------------------------------

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def prefetch(self) -> None:
        if self.unit.state == "sharded":
            self.unit.start_unshard(self._stream())

    def unshard(self) -> None:
        self.unit.wait_unshard(self._stream())

    def reshard(self) -> None:
        self.unit.reshard()

    # ---- hooks -----------------------------------------------------------------------------------------------

    def _lazy_root_init(self) -> _RootState:
        state = _RootState(self)
        for mod in self.module.modules():
            unit = unit_of(mod)
            if unit is not None:
                unit.root_state = state
                state.units.append(unit)
        # The root's backward starts right after its forward: keep its parameters (see [Note: root unit]).
        if self._explicit_reshard is None:
            self.reshard_after_forward = False
        return state

    def _pre_forward(self, module, args, kwargs):
        state = self.root_state
        if state is None:  # the first unit to run a forward is the outermost one: the root
            state = self._lazy_root_init()
        recompute = _in_backward()
        if state.root is self and state.in_backward and not recompute:
            state.abandon_backward()
        if self._in_pre_backward:  # see [Note: activation checkpointing]
            self.unshard()
            self._use(sharded=False)
            return args, kwargs
        if not state.order_recorded:
            state.forward_order.append(self)
        self._ran_forward = True
        self._post_backward_done = False
        self.unshard()
        if state.order_recorded and not recompute:
            nxt = self._neighbour(+1)
            if nxt is not None:
                nxt.prefetch()
        self._use(sharded=False)
        if torch.is_grad_enabled():
            flat, spec = tree_flatten((args, kwargs))
            idx = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
            if idx:
                outs = _PostBackward.apply(self, *[flat[i] for i in idx])
                for i, t in zip(idx, outs):
                    flat[i] = t
                args, kwargs = tree_unflatten(flat, spec)
        return args, kwargs

    def _post_forward(self, module, args, kwargs, output):
        if self._in_pre_backward:  # see [Note: activation checkpointing]
            return output
        self._use(sharded=True)
        state = self.root_state
        grad = torch.is_grad_enabled()
        if not grad or (self.reshard_after_forward and not self._is_last_in_forward() and not _in_backward()):
            self.reshard()
        if grad:
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if tensors:
                register_multi_grad_hook(tensors, self._pre_backward, mode="any")
        if state is not None and state.root is self:
            state.order_recorded = True
        return output

    def _is_last_in_forward(self) -> bool:
        """[Note: last unit keeps its parameters] The last unit to run forward is the first to run backward: freeing
        its parameters would only make pre-backward gather them again at once (torchtitan sets
        reshard_after_forward=False on the last block by hand for the same reason). Applies unless the user chose."""
        state = self.root_state
        return (self._explicit_reshard is None and state is not None and state.order_recorded
                and state.forward_order[-1] is self)

    def _neighbour(self, step: int) -> "UnitRuntime | None":
        order = self.root_state.forward_order
        try:
            k = order.index(self)
        except ValueError:
            return None
        j = k + step
        return order[j] if 0 <= j < len(order) else None

    def _pre_backward(self, _grad) -> None:
        state = self.root_state
        if not state.in_backward:
            state.in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(state.root._end_of_backward)
        # A unit may run backward more than once per step (its forward ran twice): each pass reduces again.
        self._post_backward_done = False
        self._in_pre_backward = True
        self.unshard()
        # Backward may run this unit's forward again (activation checkpointing around the unit): the recomputation
        # must see the full parameters, as FSDP2 does; post_backward swaps the shards back in.
        self._use(sharded=False)
        prev = self._neighbour(-1)
        if prev is not None:
            prev.prefetch()

    def post_backward(self) -> None:
        if self._post_backward_done:
            return
        self._post_backward_done = True
        self._in_pre_backward = False
        if self.num_trainable and self.requires_grad_sync:
            grads = [info.full.grad for info in self.params[: self.num_trainable]]
            if any(g is not None for g in grads):
                if self.unit.reducing:  # an earlier backward pass of this unit in the same step
                    self._accumulate(self.unit.wait_reduce(self._stream()))
                self.unit.start_reduce(grads, self._stream())
            for info in self.params[: self.num_trainable]:
                info.full.grad = None
        self._use(sharded=True)
        self.reshard()

    def _end_of_backward(self) -> None:
        state = self.root_state
        try:
            for unit in state.units:
                if unit._ran_forward:
                    unit.post_backward()
            for unit in state.units:
                if unit.unit.reducing:
                    unit._accumulate(unit.unit.wait_reduce(unit._stream()))
                unit.reshard()
                unit._ran_forward = False
                unit._in_pre_backward = False
        finally:
            state.in_backward = False

    def _accumulate(self, reduced: torch.Tensor) -> None:
        """Adds this rank's reduced gradient into the sharded parameters' .grad (views of one flat buffer)."""
        infos = self.params[: self.num_trainable]
        grads = [info.sharded.grad for info in infos]
        flat = self.unit.flat_grad_shard
        with torch.no_grad():
            if all(g is None for g in grads):
                flat.copy_(reduced)
                for info, view in zip(infos, self.grad_views):
                    info.sharded.grad = view
            elif all(g is v for g, v in zip(grads, self.grad_views)):
                flat.add_(reduced)
            else:
                for i, (info, view) in enumerate(zip(infos, self.grad_views)):
                    off = self.unit.shard_offset(i)
                    part = reduced[off : off + view.numel()]
                    if info.sharded.grad is None:
                        view.copy_(part)
                        info.sharded.grad = view
                    else:
                        info.sharded.grad.add_(part.to(info.sharded.grad.dtype))
