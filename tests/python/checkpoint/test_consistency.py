"""A checkpoint is the state at the moment save() was called ([Note: checkpoint consistency] in tessera/shard/fences.py): what
changes in place after save() either does not reach the checkpoint or fails the save naming the tensor. Both tests
run on 2 gloo ranks, and compare what the checkpoint files hold with copies taken at save()."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tessera
from conftest import run_ranks
from tessera.checkpoint import jsonio

SAVES = 10


class _BatchNormFirst(nn.Module):
    """BatchNorm in the root unit, run first; 32 MB of block shards per rank are staged before its buffers, so on
    the old code the next forward had updated running_mean before it was staged."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, 1024)
        self.blocks = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)])

    def forward(self, x):
        return self.blocks(self.head(self.bn(x)))


def _sharded(model: nn.Module) -> nn.Module:
    for block in model.blocks:
        tessera.shard(block)
    return tessera.shard(model)  # the root unit: what the blocks leave


def _read(reader, name: str) -> torch.Tensor:
    dtype, shape = reader.tensors[name]
    out = torch.empty(torch.Size(shape).numel(), dtype=getattr(torch, dtype))
    reader.read(name, 0, out)
    return out.reshape(shape)


def _buffers_then_forward(rank, world, root):
    torch.manual_seed(0)
    model = _sharded(_BatchNormFirst())
    ckpt = tessera.checkpoint.Checkpointer(root, keep_last=1)  # each one is read right after its wait()
    g = torch.Generator().manual_seed(rank)
    wrong = []
    for step in range(1, SAVES + 1):
        x = torch.randn(8, 64, generator=g) * step + step
        want_mean = model.bn.running_mean.clone()
        want_count = int(model.bn.num_batches_tracked)
        handle = ckpt.save(step, {"model": model})
        with torch.no_grad():
            model(x)  # at once: updates bn.running_mean and num_batches_tracked in place
        handle.wait()
        if rank != 0:
            continue
        reader = tessera._C.CheckpointReader(root, step)
        got_mean = _read(reader, "model/bn.running_mean")
        got_count = int(jsonio.loads(reader.global_json, "extras")["/buffers"]["model/bn.num_batches_tracked"])
        if got_count != want_count or not torch.equal(got_mean, want_mean):
            wrong.append(f"step {step}: num_batches_tracked {got_count} (at save {want_count}), running_mean "
                         f"{'equal' if torch.equal(got_mean, want_mean) else 'from a later moment'}")
    assert not wrong, f"{len(wrong)} of {SAVES} checkpoints differ from the state at save(): {wrong}"


def test_buffers_changed_by_the_next_forward_are_saved_as_they_were_at_save(tmp_path):
    run_ranks(2, _buffers_then_forward, str(tmp_path / "ckpt"))


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Linear(512, 512) for _ in range(16)])
        self.out = nn.Linear(512, 4)  # the root unit's own parameters

    def forward(self, x):
        return self.out(self.blocks(x))


def _write_after_save(rank, world, root):
    torch.manual_seed(0)
    model = _sharded(_Blocks())
    name = "blocks.15.weight"  # the last unit: its pieces are staged last
    shard = dict(model.named_parameters())[name]
    at_save = tessera.full_state_dict(model)
    ckpt = tessera.checkpoint.Checkpointer(root)
    handle = ckpt.save(1, {"model": model})
    with torch.no_grad():
        shard.add_(1.0)  # at once, on every rank: not an optimizer step, so no staging fence holds it back
    try:
        handle.wait()
    except tessera.CheckpointError as e:
        # Rank 1's own failure, or rank 0's report of it: either way the message names the tensor.
        assert f"model/{name} changed in place after save() while it was being staged" in str(e), str(e)
        assert ckpt.committed_steps() == []
    else:
        reader = tessera._C.CheckpointReader(root, 1)
        for k, v in at_save.items():
            assert torch.equal(_read(reader, f"model/{k}"), v), f"{k}: the checkpoint holds a later value"
    # Training and saving go on; the next checkpoint holds the state at its save().
    at_save = tessera.full_state_dict(model)
    ckpt.save(2, {"model": model}).wait()
    if rank == 0:
        reader = tessera._C.CheckpointReader(root, 2)
        for k, v in at_save.items():
            assert torch.equal(_read(reader, f"model/{k}"), v), k


def test_in_place_write_to_a_shard_after_save_is_not_saved_or_fails_the_save(tmp_path):
    run_ranks(2, _write_after_save, str(tmp_path / "ckpt"))


@pytest.mark.parametrize("optimizer", ["tessera", "torch"])
def test_optimizer_writes_released_by_the_fence_are_not_flagged(tmp_path, optimizer):
    run_ranks(2, _step_right_after_saves, str(tmp_path / "ckpt"), optimizer)


def _step_right_after_saves(rank, world, root, optimizer):
    # The optimizer updates each unit as soon as its pieces are staged: legitimate, so every save commits.
    torch.manual_seed(0)
    model = _sharded(_Blocks())
    params = list(model.parameters())
    opt = tessera.optim.AdamW(params, lr=0.1) if optimizer == "tessera" else torch.optim.AdamW(params, lr=0.1)
    ckpt = tessera.checkpoint.Checkpointer(root)
    x = torch.randn(4, 512)
    for step in range(1, 4):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        at_save = tessera.full_state_dict(model)
        model(x).sum().backward()
        handle = ckpt.save(step, {"model": model, "optim": opt})
        opt.step()
        opt.zero_grad()
        handle.wait()
        if rank == 0:
            reader = tessera._C.CheckpointReader(root, step)
            for k, v in at_save.items():
                assert torch.equal(_read(reader, f"model/{k}"), v), k
