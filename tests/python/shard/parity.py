"""Runs the same training in tessera ranks and in one process, so tests compare them step by step."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import tessera
from tessera.shard.runtime import unit_of
from models import loss_fn, make_batches, make_model

GLOBAL_BATCH = 6  # divisible by 2 and 3 ranks


class Checkpointed(nn.Module):
    """Activation checkpointing around a block: its forward runs again during backward."""

    def __init__(self, inner, reentrant):
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=self.reentrant)


def shard_model(model, strategy, mp=None, ac=None):
    """Shards each block, then the root. ac=("outside" | "inside", reentrant) adds activation checkpointing: the
    unit wraps the checkpointed block (torchtitan's order) or sits inside it (its hooks then run in the recompute)."""
    for i, blk in enumerate(list(model.blocks)):
        if ac is not None and ac[0] == "outside":
            model.blocks[i] = blk = Checkpointed(blk, ac[1])
        tessera.shard(blk, strategy=strategy, mixed_precision=mp)
        if ac is not None and ac[0] == "inside":
            model.blocks[i] = Checkpointed(blk, ac[1])
    tessera.shard(model, strategy=strategy, mixed_precision=mp)
    return model


def train_tessera(rank, world, *, strategy, steps=4, lr=1e-2, clip=None, optimizer="tessera", accum=1, mp=None,
                  split_forward=False, two_backward=False, ac=None, counts=False, fail_first_backward=False):
    """Returns (per-step global losses, per-step grad norms, full_state_dict with the unwrapped model's keys) from
    `world` gloo ranks; with counts, also each unit's (all-gathers started, all-gathers discarded unused)."""
    model = shard_model(make_model(), strategy, mp, ac)
    params = list(model.parameters())
    if optimizer == "tessera":
        opt = tessera.optim.AdamW(params, lr=lr, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.1, foreach=False)
    per = GLOBAL_BATCH // world
    if fail_first_backward:
        _backward_that_raises(model, per)
    losses, norms = [], []
    for x, y in make_batches(steps, GLOBAL_BATCH * accum):
        total = torch.zeros(())
        for k in range(accum):
            lo = k * GLOBAL_BATCH + rank * per
            tessera.set_requires_gradient_sync(model, k == accum - 1)
            xs, ys = x[lo : lo + per], y[lo : lo + per]
            if split_forward or two_backward:  # two forwards (halves of the batch)
                h = per // 2
                loss1 = h * loss_fn(model, xs[:h], ys[:h]) / per / accum
                loss2 = (per - h) * loss_fn(model, xs[h:], ys[h:]) / per / accum
                if two_backward:  # loss1.backward(); loss2.backward(): the gradients must add up
                    loss1.backward()
                    loss2.backward()
                    loss = (loss1 + loss2).detach()
                else:  # one backward through both
                    loss = loss1 + loss2
                    loss.backward()
            else:
                loss = loss_fn(model, xs, ys) / accum
                loss.backward()
            # After backward, module.parameters() are the local 1-D shards again (the root's too).
            bad = [tuple(p.shape) for p in model.parameters() if p.dim() != 1]
            assert not bad, f"after backward, module.parameters() yields unsharded tensors of shapes {bad}"
            total += loss.detach().float()
        if clip is not None:
            norms.append(tessera.clip_grad_norm_(model, clip).item())
        opt.step()
        # module.zero_grad() works as usual (the torch-optimizer run uses it instead of the optimizer's).
        model.zero_grad() if optimizer == "torch" else opt.zero_grad()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    state = {k.replace(".inner.", "."): v for k, v in tessera.full_state_dict(model).items()}
    if counts:
        units = [unit_of(m).unit for m in model.modules() if unit_of(m) is not None]
        return losses, norms, state, [(u.gathers_started, u.gathers_discarded) for u in units]
    return losses, norms, state


def _backward_that_raises(model, per):
    """A backward that raises half-way (after the last block reduced, before the first block's backward): the
    training that follows must not see anything it left behind."""
    x, y = make_batches(1, GLOBAL_BATCH, seed=99)[0]

    def boom(_grad):
        raise RuntimeError("boom in backward")

    def hook_output(_mod, _args, out):
        out.register_hook(boom)

    handle = model.blocks[0].register_forward_hook(hook_output)
    loss = loss_fn(model, x[:per], y[:per])
    handle.remove()
    try:
        loss.backward()
    except RuntimeError as e:
        assert "boom in backward" in str(e), e
    else:
        raise AssertionError("the backward did not raise")


def train_reference(*, steps=4, lr=1e-2, clip=None, accum=1, param_dtype=None):
    """The same training in one process on the whole batch with torch.optim.AdamW (fp32 master weights; with
    param_dtype, forward and backward run on a copy cast to that dtype, as tessera's mixed precision does)."""
    model = make_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.1, foreach=False)
    compute = make_model().to(param_dtype) if param_dtype else model
    losses, norms = [], []
    for x, y in make_batches(steps, GLOBAL_BATCH * accum):
        if param_dtype:
            compute.load_state_dict({k: v.to(param_dtype) for k, v in model.state_dict().items()})
        total = 0.0
        for k in range(accum):
            lo = k * GLOBAL_BATCH
            loss = loss_fn(compute, x[lo : lo + GLOBAL_BATCH], y[lo : lo + GLOBAL_BATCH]) / accum
            loss.backward()
            total += loss.item()
        if param_dtype:
            for p, c in zip(model.parameters(), compute.parameters()):
                if p.requires_grad:
                    p.grad = c.grad.float()
                    c.grad = None
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(trainable, clip).item())
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms, model.state_dict()
