"""State dicts of sharded modules against the unsharded model's values: tessera.full_state_dict /
load_full_state_dict, and the module's own state_dict() / load_state_dict() (full tensors, like FSDP1's
FULL_STATE_DICT; see [Note: state_dict() of a sharded module] in python/tessera/shard/state_dict.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import tessera
from conftest import run_ranks
from models import loss_fn, make_batches, make_model
from shard.parity import GLOBAL_BATCH, shard_model
from tessera import _C
from tessera.shard.state_dict import local_shards


def _roundtrip(rank, world, strategy_name):
    strategy = tessera.ShardingStrategy[strategy_name]
    reference = make_model(seed=0)
    tokens = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(3))
    want_logits = reference(tokens)
    # A model sharded from different weights, then loaded with the reference's: same values, same outputs.
    model = shard_model(make_model(seed=7), strategy)
    assert all(p.dim() == 1 for p in model.parameters()), "parameters() must yield 1-D local shards"
    tessera.load_full_state_dict(model, reference.state_dict())
    got = tessera.full_state_dict(model)
    want = reference.state_dict()
    assert list(got) == list(want), "keys (and their order) must match the unsharded module's state_dict"
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert got["head.weight"].data_ptr() == got["embed.weight"].data_ptr() or torch.equal(
        got["head.weight"], got["embed.weight"])
    torch.testing.assert_close(model(tokens), want_logits, rtol=1e-6, atol=1e-6)
    # The local shards are exactly this rank's slices: their sizes add up to the model's over the ranks.
    local = torch.tensor([sum(p.numel() for p in model.parameters())])
    torch.distributed.all_reduce(local)
    unique = sum(p.numel() for p in reference.parameters())
    assert local.item() == unique * (world if strategy is tessera.ShardingStrategy.NO_SHARD else 1)


def test_roundtrip_full_shard_3_ranks():
    run_ranks(3, _roundtrip, "FULL_SHARD")


def test_roundtrip_no_shard_2_ranks():
    run_ranks(2, _roundtrip, "NO_SHARD")


# ---- module.state_dict() / load_state_dict() ------------------------------------------------------------------


def _count_gathers() -> list[int]:
    """Patches _C.Unit.gather_full (in this rank process only) to count its calls: one per unit and state_dict()."""
    calls = [0]
    original = _C.Unit.gather_full

    def counting(self):
        calls[0] += 1
        return original(self)

    _C.Unit.gather_full = counting
    return calls


def _assert_same_state(got, want, what):
    assert list(got) == list(want), f"{what}: keys (and their order) differ from the unsharded module's"
    for k, v in want.items():
        g = got[k]
        assert g.shape == v.shape and g.dtype == v.dtype, f"{what}: {k}: {g.shape} {g.dtype} vs {v.shape} {v.dtype}"
        assert g.device.type == "cpu" and not g.requires_grad, f"{what}: {k} must be a detached CPU tensor"
        assert torch.equal(g, v), f"{what}: {k} values differ"


def _state_dict_like_unsharded(rank, world, strategy_name, bf16):
    strategy = tessera.ShardingStrategy[strategy_name]
    want = make_model(seed=0).state_dict()
    # Under mixed precision the module computes in bf16, but state_dict() gives the fp32 shards' values.
    mp = tessera.MixedPrecision(param_dtype=torch.bfloat16) if bf16 else None
    model = shard_model(make_model(seed=0), strategy, mp)
    if bf16:
        model(make_batches(1, 2)[0][0]).sum().backward()  # leaves the bf16 copies behind, as training does
    gathers = _count_gathers()
    got = model.state_dict()
    _assert_same_state(got, want, "model.state_dict()")
    assert gathers[0] == 3, f"each of the 3 units must be gathered once per state_dict(), got {gathers[0]} gathers"
    # Tied weights: both keys, one tensor (as torch gives one storage).
    assert got["head.weight"].data_ptr() == got["embed.weight"].data_ptr()
    # Submodules give their own keys: a unit, a module inside a unit, a container of units, the root unit's norm.
    for name in ("blocks.1", "blocks.0.fc1", "blocks", "norm"):
        sub = model.get_submodule(name)
        _assert_same_state(sub.state_dict(), {k[len(name) + 1:]: v for k, v in want.items()
                                              if k.startswith(name + ".")}, f"{name}.state_dict()")
    _assert_same_state(model.state_dict(prefix="m."), {f"m.{k}": v for k, v in want.items()}, "prefix='m.'")
    # tessera's own key-only callers do not gather: no collective where a rank may be alone.
    gathers[0] = 0
    with local_shards():
        local = model.state_dict()
    assert all(local[k].dim() == 1 for k in want if k != "scale"), "local_shards() must give the 1-D shards"
    from tessera.checkpoint.state import Collected, collect_module

    collect_module("model", model, rank, world, Collected())
    tessera.load_full_state_dict(model, want)
    assert gathers[0] == 0, f"key-only state_dict() calls gathered {gathers[0]} times"


@pytest.mark.parametrize("world,strategy,bf16", [(2, "FULL_SHARD", False), (3, "FULL_SHARD", False),
                                                 (2, "NO_SHARD", False), (2, "SHARD_GRAD_OP", True)])
def test_state_dict_equals_unsharded(world, strategy, bf16):
    run_ranks(world, _state_dict_like_unsharded, strategy, bf16)


def _train(model, rank, world, opt, steps, seed=1):
    """`steps` AdamW steps on this rank's part of each global batch (world=1: the whole batch, one process)."""
    per = GLOBAL_BATCH // world
    losses = []
    for x, y in make_batches(steps, GLOBAL_BATCH, seed=seed):
        loss = loss_fn(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _reference_training(start_state, steps):
    """One process, the whole batch, torch.optim.AdamW, from `start_state`: the independent reference."""
    model = make_model(seed=0)
    model.load_state_dict(start_state)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1,
                            foreach=False)
    return _train(model, 0, 1, opt, steps), model.state_dict()


def _save_load_train(rank, world, path):
    start = make_model(seed=5).state_dict()  # neither the sharded model's nor the reference model's own init
    model = shard_model(make_model(seed=0), tessera.ShardingStrategy.FULL_SHARD)
    model.load_state_dict(start)
    _assert_same_state(model.state_dict(), start, "after load_state_dict(full)")
    opt = tessera.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = _train(model, rank, world, opt, steps=3)
    want_losses, want = _reference_training(start, steps=3)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    got = model.state_dict()
    _assert_same_state(got, tessera.full_state_dict(model), "state_dict() vs full_state_dict() after training")
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    # torch.save / torch.load round trip, into a fresh sharded model and into an unsharded one.
    if rank == 0:
        torch.save(got, path)
    dist.barrier()
    loaded = torch.load(path, weights_only=True)
    fresh = shard_model(make_model(seed=9), tessera.ShardingStrategy.FULL_SHARD)
    result = fresh.load_state_dict(loaded)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(fresh.state_dict(), got, "fresh sharded model loaded from the file")
    plain = make_model(seed=9)
    plain.load_state_dict(loaded)
    _assert_same_state(plain.state_dict(), got, "unsharded model loaded from the file")
    assert plain.head.weight is plain.embed.weight
    tokens = make_batches(1, 2, seed=4)[0][0]
    torch.testing.assert_close(fresh(tokens), plain(tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_load_train_save_roundtrip(tmp_path, world):
    run_ranks(world, _save_load_train, str(tmp_path / "model.pt"))


def _strictness_and_errors(rank, world):
    import tessera.shard.fences as fences

    model = shard_model(make_model(seed=0), tessera.ShardingStrategy.FULL_SHARD)
    plain = make_model(seed=0)
    new = make_model(seed=3).state_dict()
    # Non-strict with a missing and an unexpected key: the same result as torch's, the rest loaded.
    partial = {k: v for k, v in new.items() if k != "blocks.0.fc1.bias"}
    partial["blocks.0.extra"] = torch.zeros(3)
    got, want = model.load_state_dict(partial, strict=False), plain.load_state_dict(partial, strict=False)
    assert (got.missing_keys, got.unexpected_keys) == (want.missing_keys, want.unexpected_keys) == (
        ["blocks.0.fc1.bias"], ["blocks.0.extra"])
    _assert_same_state(model.state_dict(), plain.state_dict(), "after a non-strict load")
    # Strict: torch's error for the same dict.
    with pytest.raises(RuntimeError) as sharded_err:
        model.load_state_dict(partial)
    with pytest.raises(RuntimeError) as plain_err:
        plain.load_state_dict(partial)
    assert str(sharded_err.value) == str(plain_err.value)
    # A wrong shape: a clear error naming the key and both shapes, and nothing written (checked before loading).
    before = model.state_dict()
    bad = dict(new)
    bad["blocks.1.fc2.weight"] = torch.zeros(5, 5)
    with pytest.raises(tessera.InvalidArgumentError, match=r"'blocks\.1\.fc2\.weight' has shape \(5, 5\) "
                                                           r"in the state dict but \(20, 61\) in the module"):
        model.load_state_dict(bad)
    _assert_same_state(model.state_dict(), before, "after a rejected load")
    # The 1-D local shards (what state_dict() gave before) get the same error, pointing at the full-state API.
    with local_shards():
        shards = model.state_dict()
    with pytest.raises(tessera.InvalidArgumentError, match=r"'pos' has shape \(\d+,\) .*tessera\.full_state_dict"):
        model.load_state_dict(shards)
    # Loading waits for checkpoint staging in flight before it writes a shard.
    waits = []
    original = fences.wait_all
    fences.wait_all = lambda: waits.append(1) or original()
    try:
        model.load_state_dict(new)
    finally:
        fences.wait_all = original
    assert waits, "load_state_dict must wait for in-flight checkpoint staging (fences.wait_all)"
    _assert_same_state(model.state_dict(), new, "after a strict load")
    # A submodule loads (and gives back) its own keys.
    block = {k[len("blocks.1."):]: v for k, v in make_model(seed=4).state_dict().items() if k.startswith("blocks.1.")}
    model.blocks[1].load_state_dict(block)
    _assert_same_state(model.blocks[1].state_dict(), block, "blocks.1 after its own load_state_dict")


def test_strict_non_strict_and_errors():
    run_ranks(2, _strictness_and_errors)

