"""Sharded training on 2 and 3 gloo ranks equals the same training in one process (DESIGN.md section 6)."""

from __future__ import annotations

import pytest
import torch

import tessera
from conftest import run_ranks
from shard.parity import train_reference, train_tessera

S = tessera.ShardingStrategy


def _worker(rank, world, out_path, kwargs):
    result = train_tessera(rank, world, **kwargs)
    if rank == 0:
        torch.save(result, out_path)


def _run(tmp_path, world, **kwargs):
    out = tmp_path / "result.pt"
    run_ranks(world, _worker, str(out), kwargs)
    return torch.load(out, weights_only=True)


def _assert_state_close(got, want, atol, rtol):
    assert sorted(got) == sorted(want), "full_state_dict keys differ from the unsharded model's"
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", [S.FULL_SHARD, S.SHARD_GRAD_OP, S.NO_SHARD])
def test_matches_single_process_with_clipping(tmp_path, world, strategy):
    losses, norms, state = _run(tmp_path, world, strategy=strategy, clip=0.5)
    ref_losses, ref_norms, ref_state = train_reference(clip=0.5)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    # clip_grad_norm_ returns the same global norm torch computes on the unsharded model (and really clips).
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    assert max(ref_norms) > 0.5
    _assert_state_close(state, ref_state, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def gathers_without_checkpointing(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("plain"), 2, strategy=S.FULL_SHARD, clip=0.5, steps=3, counts=True)[3]


@pytest.mark.parametrize("ac", [("outside", False), ("outside", True), ("inside", False), ("inside", True)],
                         ids=lambda a: f"{a[0]}-{'reentrant' if a[1] else 'nonreentrant'}")
def test_activation_checkpointing(tmp_path, ac, gathers_without_checkpointing):
    # Each block's forward runs again in backward: it must see the full parameters, and its gradients must be
    # reduced exactly once. ("outside" read the 1-D shards in the recompute before pre-backward swapped them out.)
    steps = 3
    losses, norms, state, gathers = _run(tmp_path, 2, strategy=S.FULL_SHARD, clip=0.5, ac=ac, steps=steps,
                                         counts=True)
    ref_losses, ref_norms, ref_state = train_reference(clip=0.5, steps=steps)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    _assert_state_close(state, ref_state, atol=2e-5, rtol=1e-4)
    # The recomputation gathers nothing extra: it neither prefetches a unit whose backward is over (those all-gathers
    # were discarded unused, and one issued under checkpointing's saved-tensor hooks once deadlocked CI) nor
    # reshards before its own backward. Units in model.modules() order: root, then blocks.
    want = list(gathers_without_checkpointing)
    if ac == ("inside", True):  # reentrant: the last block's forward runs without grad and frees its parameters,
        want[-1] = (2 * steps, 0)  # so it gathers twice every step (plain training keeps them from step 2 on)
    assert gathers == want


def test_training_after_a_backward_that_raised(tmp_path):
    # The failed backward left a reduction in flight, gradients on the full parameters and gathered units; the next
    # forward drops them, so training then matches a run that never had the failure.
    losses, _, state = _run(tmp_path, 2, strategy=S.FULL_SHARD, fail_first_backward=True, steps=3)
    ref_losses, _, ref_state = train_reference(steps=3)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    _assert_state_close(state, ref_state, atol=2e-5, rtol=1e-4)


def test_torch_optimizer_on_local_shards(tmp_path):
    # module.parameters() are ordinary tensors: an elementwise torch optimizer steps on them directly.
    losses, _, state = _run(tmp_path, 2, strategy=S.FULL_SHARD, optimizer="torch")
    ref_losses, _, ref_state = train_reference()
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    _assert_state_close(state, ref_state, atol=2e-5, rtol=1e-4)


def test_two_forwards_one_backward(tmp_path):
    # Each unit runs forward twice and backward twice per step: both passes' gradients are reduced.
    losses, _, state = _run(tmp_path, 2, strategy=S.FULL_SHARD, split_forward=True, steps=3)
    ref_losses, _, ref_state = train_reference(steps=3)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    _assert_state_close(state, ref_state, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", [S.FULL_SHARD, S.NO_SHARD])
def test_two_backward_calls_in_one_step(tmp_path, strategy):
    # Two forwards, then loss1.backward(); loss2.backward(): every parameter gets grad(loss1) + grad(loss2), as in
    # one process. Before the fix the root unit's own parameters (embedding/head, norm) kept only the first pass's
    # gradient, the second leaked into the next step, and model.parameters() yielded the root's 2-D tensors.
    losses, _, state = _run(tmp_path, 2, strategy=strategy, two_backward=True, steps=3)
    ref_losses, _, ref_state = train_reference(steps=3)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    _assert_state_close(state, ref_state, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", [S.FULL_SHARD, S.NO_SHARD])
def test_gradient_accumulation_without_sync(tmp_path, strategy):
    # Two micro-batches, the first without gradient reduction: equals one step on both micro-batches.
    losses, _, state = _run(tmp_path, 2, strategy=strategy, accum=2, steps=3)
    ref_losses, _, ref_state = train_reference(accum=2, steps=3)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    _assert_state_close(state, ref_state, atol=2e-5, rtol=1e-4)


def test_bf16_mixed_precision(tmp_path):
    mp = tessera.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    lr = 1e-3
    losses, _, state = _run(tmp_path, 2, strategy=S.FULL_SHARD, mp=mp, lr=lr, steps=3)
    ref_losses, _, ref_state = train_reference(param_dtype=torch.bfloat16, lr=lr, steps=3)
    # bf16 has 8 mantissa bits: losses agree to about 1e-2 relative.
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=0)
    # The shard keeps fp32 master weights (not bf16) ...
    assert all(v.dtype == torch.float32 for k, v in state.items() if k != "scale")
    # ... that move like the reference's: each AdamW step moves a weight by at most ~lr, so differences stay a
    # small fraction of the 3*lr a weight can travel, while the weights really moved.
    moved = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
    travelled = max((ref_state[k] - v).abs().max().item() for k, v in train_reference(lr=0.0, steps=1)[2].items())
    assert moved < 1.5 * lr, moved
    assert travelled > 2 * lr
