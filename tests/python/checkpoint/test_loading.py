"""Loading: zero-element tensors round-trip at any world size; a checkpoint that cannot be loaded is an error
naming what is wrong, on every rank (never a silent fresh start, never "could not be read on another rank")."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import tessera
from conftest import run_ranks


class _WithEmpty(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.empty = nn.Parameter(torch.empty(0))  # e.g. a bias of a pruned-away layer
        self.empty2d = nn.Parameter(torch.empty(3, 0))
        self.tail = nn.Linear(5, 4)

    def forward(self, x):
        return self.tail(self.lin(x)) + self.empty.sum() + self.empty2d.sum()


def _make(seed, cls=_WithEmpty):
    torch.manual_seed(seed)
    model = tessera.shard(cls())
    opt = tessera.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, {"model": model, "optim": opt, "train": {"step": 0}}


def _train(model, opt, state, rank, steps):
    for _ in range(steps):
        g = torch.Generator().manual_seed(100 * state["train"]["step"] + rank)
        model(torch.randn(4, 6, generator=g)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        state["train"]["step"] += 1


def _save_with_empty(rank, world, root, out):
    model, opt, state = _make(0)
    _train(model, opt, state, rank, 2)
    tessera.checkpoint.Checkpointer(root).save(2, state).wait()
    saved = tessera.full_state_dict(model)
    _train(model, opt, state, rank, 1)  # the reference for the optimizer state: one more step after the save
    final = tessera.full_state_dict(model)
    if rank == 0:
        torch.save({"saved": saved, "final": final}, out)


def _load_with_empty(rank, world, root, ref_path):
    ref = torch.load(ref_path, weights_only=True)
    model, opt, state = _make(7)  # other weights: everything must come from the checkpoint
    assert tessera.checkpoint.Checkpointer(root).load_latest(state) == 2
    assert state["train"] == {"step": 2}
    loaded = tessera.full_state_dict(model)
    assert sorted(loaded) == sorted(ref["saved"])
    for k, v in ref["saved"].items():
        assert loaded[k].shape == v.shape and torch.equal(loaded[k], v), k
    assert loaded["empty"].shape == (0,) and loaded["empty2d"].shape == (3, 0)
    if world == 2:  # same data split: training continues as if uninterrupted
        _train(model, opt, state, rank, 1)
        for k, v in ref["final"].items():
            assert torch.equal(tessera.full_state_dict(model)[k], v), k


@pytest.fixture(scope="module")
def saved_with_empty(tmp_path_factory):
    d = tmp_path_factory.mktemp("empty")
    run_ranks(2, _save_with_empty, str(d / "ckpt"), str(d / "ref.pt"))
    return d


@pytest.mark.parametrize("world", [2, 3, 1])
def test_zero_element_parameters_round_trip_at_any_world_size(saved_with_empty, world):
    d = saved_with_empty
    run_ranks(world, _load_with_empty, str(d / "ckpt"), str(d / "ref.pt"))


def _flip_a_bit_of(root, step, rank):
    """Flips one bit inside the first tensor piece stored in rank `rank`'s data file; returns (file, tensor)."""
    step_dir = os.path.join(root, f"step-{step:010d}")
    with open(os.path.join(step_dir, "manifest.json")) as f:
        manifest = json.load(f)
    file_index = next(i for i, f in enumerate(manifest["files"]) if f["rank"] == rank)
    tensor, piece = next((t["name"], p) for t in manifest["tensors"] for p in t["pieces"] if p["file"] == file_index)
    name = manifest["files"][file_index]["name"]
    with open(os.path.join(step_dir, name), "r+b") as f:
        f.seek(piece["offset"] + 3)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x04]))
    return name, tensor


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.tail = nn.Linear(5, 4)

    def forward(self, x):
        return self.tail(self.lin(x))


def _load_damaged(rank, world, root):
    model, opt, state = _make(0, _Plain)
    ckpt = tessera.checkpoint.Checkpointer(root, keep_last=0)
    ckpt.save(1, state).wait()
    _train(model, opt, state, rank, 1)
    ckpt.save(2, state).wait()
    if rank == 0:
        damaged = _flip_a_bit_of(root, 2, rank=1)
    damaged = [damaged if rank == 0 else None]
    torch.distributed.broadcast_object_list(damaged, src=0)  # test bookkeeping only
    file, tensor = damaged[0]
    with pytest.raises(tessera.CheckpointError) as info:
        ckpt.load(2, state)
    msg = str(info.value)
    # Every rank, rank 0 included (its own reads succeed), names rank 1's damaged file and tensor.
    path = os.path.join(root, "step-0000000002", file)
    assert f"rank 1: checksum mismatch in {path} for tensor '{tensor}'" in msg, msg
    assert "rank 0:" not in msg, msg
    # load_latest skips it (each rank warns with the same reason) and loads step 1.
    assert ckpt.load_latest(state) == 1


def test_damage_in_another_ranks_file_is_named_on_every_rank(tmp_path):
    run_ranks(2, _load_damaged, str(tmp_path / "ckpt"))


def test_load_latest_raises_naming_each_step_when_none_loads(tmp_path, single_rank_group):
    root = str(tmp_path / "ckpt")
    ckpt = tessera.checkpoint.Checkpointer(root, keep_last=0)
    model, opt, state = _make(0, _Plain)
    assert ckpt.load_latest(state) is None  # nothing committed yet: a fresh start
    for step in (1, 2):
        _train(model, opt, state, 0, 1)
        ckpt.save(step, state).wait()
    damaged = {step: _flip_a_bit_of(root, step, rank=0) for step in (1, 2)}
    with pytest.raises(tessera.CheckpointError) as info:
        ckpt.load_latest(state)
    msg = str(info.value)
    assert "none of the 2 committed checkpoints" in msg, msg
    for step, (file, tensor) in damaged.items():
        assert f"step {step}: checkpoint step {step} in {root}: checksum mismatch in " in msg, msg
        assert f"{file} for tensor '{tensor}'" in msg, msg


def test_read_only_checkpointer_leaves_a_save_in_progress_alone(tmp_path):
    """A read-only Checkpointer (what `tessera generate` uses on a training job's checkpoints) creates nothing,
    removes no .tmp-* directory (a writer removes them as crash leftovers), and refuses to save."""
    import tessera
    from tessera.checkpoint import Checkpointer

    root = tmp_path / "ckpt"
    assert Checkpointer(root, read_only=True).committed_steps() == []
    assert not root.exists()
    root.mkdir()
    in_progress = root / ".tmp-step-0000000007"  # format.cc TmpStepDirName
    in_progress.mkdir()
    (in_progress / "data").write_bytes(b"x")
    ckpt = Checkpointer(root, read_only=True)
    assert in_progress.is_dir()
    with pytest.raises(tessera.StateError, match="read_only=True"):
        ckpt.save(1, {"x": 1})
    Checkpointer(root)  # a writer does clean up: the test would notice if the name above stopped looking stale
    assert not in_progress.exists()
