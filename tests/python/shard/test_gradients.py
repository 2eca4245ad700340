"""Which parameters get a gradient, and so an update, on sharded ranks: exactly those that get one in one process.

Each test trains on 2-3 gloo ranks and in one process on the whole batch with the same data and compares.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import tessera
from conftest import run_ranks

S = tessera.ShardingStrategy
STEPS, BATCH, DIM = 6, 6, 5


class TwoWeights(nn.Module):
    """One unit with two weights. `second` is used only in the steps and on the samples the caller says."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Parameter(torch.randn(DIM, DIM) * 0.3)
        self.second = nn.Parameter(torch.randn(DIM, DIM) * 0.3)
        self.bias = nn.Parameter(torch.zeros(DIM))

    def forward(self, x, use_second: torch.Tensor, reach_loss: bool = True):
        y = x @ self.first + self.bias
        if bool(use_second.any()):  # data-dependent: only when some sample of this batch routes through it
            z = (x * use_second[:, None]) @ self.second
            y = y + z if reach_loss else y + z.detach() * 0  # used in forward, but not reached by the loss
        return y


def _data(step: int):
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g)


def _routing(mode: str, step: int) -> torch.Tensor:
    """Which samples use `second`: 'late' = none in steps 1-3, all from step 4; 'one_rank' = only the last two
    samples (on 2 or 3 ranks: the last rank's) in every step; 'unreached' = all, but the loss ignores it in 1-3."""
    use = torch.zeros(BATCH)
    if mode == "late" and step >= 3 or mode == "unreached":
        use[:] = 1
    elif mode == "one_rank":
        use[-2:] = 1
    return use


def _reference(mode: str):
    model = TwoWeights()
    second0 = model.second.detach().clone()
    seconds = []  # `second` after each step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(STEPS):
        x, t = _data(step)
        reach = not (mode == "unreached" and step < 3)
        loss = ((model(x, _routing(mode, step), reach) - t) ** 2).sum() / BATCH
        loss.backward()
        opt.step()
        opt.zero_grad()
        seconds.append(model.second.detach().clone())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, second0, seconds


def _worker(rank, world, out, mode, strategy, optimizer):
    model = TwoWeights()
    tessera.shard(model, strategy=strategy)
    opt = (tessera.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) if optimizer == "tessera"
           else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False))
    per = BATCH // world
    lo, hi = rank * per, (rank + 1) * per
    seconds, grads_none = [], []
    for step in range(STEPS):
        x, t = _data(step)
        reach = not (mode == "unreached" and step < 3)
        loss = ((model(x[lo:hi], _routing(mode, step)[lo:hi], reach) - t[lo:hi]) ** 2).sum() / BATCH
        loss.backward()
        grads_none.append(model.second.grad is None)
        opt.step()
        opt.zero_grad()
        seconds.append(tessera.full_state_dict(model)["second"])
    state = tessera.full_state_dict(model)
    if rank == 0:
        torch.save({"state": state, "seconds": seconds, "grads_none": grads_none}, out)


@pytest.mark.parametrize("world,mode,strategy,optimizer", [
    (2, "late", S.FULL_SHARD, "tessera"),
    (3, "late", S.NO_SHARD, "torch"),
    (2, "unreached", S.FULL_SHARD, "torch"),
    (3, "one_rank", S.FULL_SHARD, "tessera"),
    (2, "one_rank", S.SHARD_GRAD_OP, "torch"),
])
def test_no_gradient_means_no_update(tmp_path, world, mode, strategy, optimizer):
    # 'late' / 'unreached': `second` gets no gradient in steps 1-3 on any rank, so (as in one process) it keeps
    # grad=None and AdamW leaves it alone: no weight decay, no step count. Before the fix it got a zero gradient and
    # moved by lr*wd*w (1e-3 relative) each step, and the run ended ~1e-2 off. 'one_rank': only the last rank's
    # samples use it, so every rank must still update it with the averaged gradient.
    out = tmp_path / "r.pt"
    run_ranks(world, _worker, str(out), mode, strategy, optimizer)
    got = torch.load(out, weights_only=True)
    want, second0, ref_seconds = _reference(mode)
    if mode in ("late", "unreached"):
        assert got["grads_none"][:3] == [True] * 3
        for step in range(3):
            assert torch.equal(got["seconds"][step], second0), f"'second' moved in step {step + 1}"
    else:
        assert got["grads_none"] == [False] * STEPS
    for step in range(STEPS):
        torch.testing.assert_close(got["seconds"][step], ref_seconds[step], rtol=1e-5, atol=1e-6)
    for k in want:
        torch.testing.assert_close(got["state"][k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


# ---- requires_grad_() after tessera.shard ---------------------------------------------------------------------------


def _freeze_schedule(model_blocks, step):
    """Block 0 frozen in steps 3-4 and trainable again from step 5: a fine-tuning schedule."""
    model_blocks[0].requires_grad_(not 2 <= step < 4)


def _freeze_worker(rank, world, out, optimizer):
    from models import loss_fn, make_batches, make_model
    from shard.parity import GLOBAL_BATCH

    model = make_model()
    for blk in model.blocks:
        tessera.shard(blk)
    tessera.shard(model)
    params = [p for p in model.parameters()]
    opt = (tessera.optim.AdamW(params, lr=1e-2, weight_decay=0.1) if optimizer == "tessera"
           else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False))
    per = GLOBAL_BATCH // world
    for step, (x, y) in enumerate(make_batches(6, GLOBAL_BATCH)):
        _freeze_schedule(model.blocks, step)
        loss = loss_fn(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = tessera.full_state_dict(model)
    if rank == 0:
        torch.save(state, out)


def _freeze_reference():
    from models import loss_fn, make_batches, make_model
    from shard.parity import GLOBAL_BATCH

    model = make_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1,
                            foreach=False)
    for step, (x, y) in enumerate(make_batches(6, GLOBAL_BATCH)):
        _freeze_schedule(model.blocks, step)
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


@pytest.mark.parametrize("optimizer", ["tessera", "torch"])
def test_requires_grad_after_shard_takes_effect(tmp_path, optimizer):
    # Freezing block 0 for two steps and unfreezing it: as in one process. Before the fix the change was ignored
    # (the frozen block kept training).
    out = tmp_path / "r.pt"
    run_ranks(2, _freeze_worker, str(out), optimizer)
    got = torch.load(out, weights_only=True)
    want = _freeze_reference()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")


def test_unfreezing_a_parameter_frozen_at_shard_time_raises_naming_it(single_rank_group):
    from models import loss_fn, make_batches, make_model

    model = make_model()  # model.pos is frozen
    tessera.shard(model)
    model.pos.requires_grad_(True)
    x, y = make_batches(1, 2)[0]
    with pytest.raises(tessera.StateError, match="parameter 'pos' was frozen"):
        loss_fn(model, x, y)
    model.pos.requires_grad_(False)
    loss_fn(model, x, y).backward()  # back to the layout it was sharded with: training goes on
    assert all(p.dim() == 1 for p in model.parameters())
    dist.barrier()
