"""Bad input gets a clear tessera error naming the module or parameter and what was expected."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import tessera
from conftest import run_ranks


def test_shard_twice(single_rank_group):
    m = nn.Linear(4, 3)
    tessera.shard(m)
    with pytest.raises(tessera.StateError, match="already sharded"):
        tessera.shard(m)


def test_unsupported_strategy(single_rank_group):
    with pytest.raises(tessera.NotSupportedError, match="HYBRID_SHARD is not yet supported"):
        tessera.shard(nn.Linear(4, 3), strategy=tessera.ShardingStrategy.HYBRID_SHARD)
    with pytest.raises(tessera.InvalidArgumentError, match="is not a tessera.ShardingStrategy"):
        tessera.shard(nn.Linear(4, 3), strategy="full_shard")


def test_non_floating_parameter(single_rank_group):
    m = nn.Linear(4, 3)
    m.count = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(tessera.InvalidArgumentError, match="parameter 'count' has dtype torch.int64"):
        tessera.shard(m)


def test_parameters_on_different_devices(single_rank_group):
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2, device="meta"))
    with pytest.raises(tessera.InvalidArgumentError, match="parameter '1.weight' is on meta but '0.weight' is on cpu"):
        tessera.shard(m)


def test_tied_weight_split_across_units(single_rank_group):
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    tessera.shard(emb)
    with pytest.raises(tessera.InvalidArgumentError, match="tied parameters must live in one unit"):
        tessera.shard(model)


def test_bad_mixed_precision_and_options(single_rank_group):
    with pytest.raises(tessera.InvalidArgumentError, match="MixedPrecision.param_dtype=torch.int32"):
        tessera.MixedPrecision(param_dtype=torch.int32)
    with pytest.raises(tessera.InvalidArgumentError, match="reshard_after_forward applies to FULL_SHARD only"):
        tessera.shard(nn.Linear(2, 2), strategy=tessera.ShardingStrategy.NO_SHARD, reshard_after_forward=True)
    with pytest.raises(tessera.InvalidArgumentError, match="expects an nn.Module"):
        tessera.shard(torch.zeros(3))
    with pytest.raises(tessera.InvalidArgumentError, match="no parameters left to shard"):
        tessera.shard(nn.ReLU())


def test_optimizer_and_clip_arguments(single_rank_group):
    m = tessera.shard(nn.Linear(4, 3))
    with pytest.raises(tessera.InvalidArgumentError, match="lr must be >= 0"):
        tessera.optim.AdamW(m.parameters(), lr=-1.0)
    with pytest.raises(tessera.InvalidArgumentError, match=r"betas must be in \[0, 1\)"):
        tessera.optim.AdamW(m.parameters(), betas=(0.9, 1.5))
    with pytest.raises(tessera.NotSupportedError, match="norm_type=1.0"):
        tessera.clip_grad_norm_(m, 1.0, norm_type=1.0)
    with pytest.raises(tessera.InvalidArgumentError, match="contains no tessera-sharded module"):
        tessera.full_state_dict(nn.Linear(2, 2))


def test_load_state_dict_mismatch(single_rank_group):
    m = tessera.shard(nn.Linear(4, 3))
    with pytest.raises(tessera.InvalidArgumentError, match=r"missing keys \['bias'\], unexpected keys \['b'\]"):
        tessera.load_full_state_dict(m, {"weight": torch.zeros(3, 4), "b": torch.zeros(3)})
    with pytest.raises(tessera.InvalidArgumentError, match=r"'weight' has shape \(4, 3\) in the state dict but \(3, 4\)"):
        tessera.load_full_state_dict(m, {"weight": torch.zeros(4, 3), "bias": torch.zeros(3)})


def _group_without_this_rank(rank, world):
    other = dist.new_group(ranks=[1])
    if rank == 0:
        with pytest.raises(tessera.InvalidArgumentError, match="does not contain rank 0"):
            tessera.shard(nn.Linear(3, 3), group=other)
    dist.barrier()


def test_group_without_this_rank():
    run_ranks(2, _group_without_this_rank)


# ---- changes after sharding are never half applied (issue 17, fault 9) ------------------------------------------


def _sharded_tiny():
    from models import make_model

    model = make_model()
    for blk in model.blocks:
        tessera.shard(blk)
    return tessera.shard(model)


def test_dtype_and_device_conversions_after_shard_raise_and_change_nothing(single_rank_group):
    # Before the fix, model.to(torch.bfloat16) made the shards report bf16 while logits and state_dict() stayed
    # fp32 and gradients came back fp32: training went on half converted.
    from models import make_batches

    model = _sharded_tiny()
    x, _ = make_batches(1, 2)[0]
    logits = model(x).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.blocks[0].double(),
                    lambda m: m.bfloat16()):
        with pytest.raises(tessera.StateError, match=r"tessera.MixedPrecision\(param_dtype=torch\.(bfloat16|float16|float64)\)"):
            convert(model)
    with pytest.raises(tessera.StateError, match="Move the model to its device before tessera.shard"):
        model.to("meta")
    assert model.float() is model and model.to("cpu") is model  # changes nothing: allowed
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers())
    assert torch.equal(model(x), logits)
    for k, v in model.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    assert type(model).__name__ == "TinyTransformer" and isinstance(model, nn.Module)


def test_optimizer_built_before_shard_raises_at_its_first_step(single_rank_group):
    # Before the fix it held the replaced parameters and trained nothing, with no error.
    from models import loss_fn, make_batches, make_model

    for make_opt in (lambda ps: torch.optim.SGD(ps, lr=0.1), lambda ps: tessera.optim.AdamW(ps, lr=0.1)):
        model = make_model()
        opt = make_opt(model.parameters())
        tessera.shard(model)
        loss_fn(model, *make_batches(1, 2)[0]).backward()
        with pytest.raises(tessera.StateError, match="holds parameter 'pos' of unit 'TinyTransformer' as it was before tessera.shard"):
            opt.step()
        opt = make_opt(model.parameters())  # built after shard: fine
        opt.step()


def test_sharding_the_root_before_a_block_says_bottom_up(single_rank_group):
    from models import make_model

    model = make_model()
    tessera.shard(model)
    with pytest.raises(tessera.StateError, match="shard each block first, then the root"):
        tessera.shard(model.blocks[0])
