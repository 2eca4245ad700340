"""full_state_dict / load_full_state_dict round trips against the unsharded model's values."""

from __future__ import annotations

import torch

import tessera
from conftest import run_ranks
from models import make_model
from shard.parity import shard_model


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
