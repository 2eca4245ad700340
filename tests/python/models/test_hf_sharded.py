"""load_hf(shard=True) and save_hf on sharded models, 2 and 3 gloo ranks, against the one-process model: the
logits are the same, each rank fills one unit at a time (never the whole model), and the files save_hf writes
from the sharded model are byte-equal to the ones it was loaded from."""

from __future__ import annotations

import pytest
import torch
from conftest import run_ranks
from hf_tiny import make
from safetensors.torch import load_file

import tessera
import tessera.models as tm
from tessera.models.hf import load as hf_load


def _sharded(rank, world, src, out, strategy_name):
    filled = []  # parameter elements materialised per before_shard call
    original = hf_load.fill_from

    def recording(*args, **kwargs):
        fill = original(*args, **kwargs)

        def wrapped(module):
            filled.append(sum(p.numel() for p in module.parameters() if p.is_meta))
            fill(module)
        return wrapped

    hf_load.fill_from = recording
    try:
        model = tm.load_hf(src, shard=True, strategy=tessera.ShardingStrategy[strategy_name])
    finally:
        hf_load.fill_from = original
    reference = tm.load_hf(src)  # the one-process model
    total = sum(p.numel() for p in reference.parameters())
    assert len(filled) == reference.config.n_layers + 1  # one fill per block, then the root
    assert max(filled) < total / 2, f"a rank held {max(filled)} of {total} elements at once"
    assert all(p.dim() == 1 for p in model.parameters()), "sharded parameters are 1-D local shards"
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=1e-6)
    tm.save_hf(model, out)
    assert (out / "config.json").is_file()  # every rank returns after rank 0's files are in place


@pytest.mark.parametrize("world,name,strategy", [
    (2, "llama_mha_tied_head_dim", "FULL_SHARD"),
    (3, "mistral_sliding_window", "NO_SHARD"),
])
def test_sharded_load_and_save_equal_one_process(world, name, strategy, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make(name, src)
    run_ranks(world, _sharded, src, out, strategy)
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
