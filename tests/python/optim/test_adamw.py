"""tessera.optim.AdamW has torch.optim.AdamW's math (float64 reference) on plain tensors and on shards."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tessera


def _params(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for n in (7, 1, 130)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_tensors_match_torch_adamw(dtype):
    seed = torch.randint(0, 2**31, ()).item()
    ours, ref = _params(dtype, seed), _params(torch.float64, seed)
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3)
    opt = tessera.optim.AdamW([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.01, "weight_decay": 0.0}], **kw)
    ropt = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "lr": 0.01, "weight_decay": 0.0}], **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(5):
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g, dtype=torch.float64)
            a.grad, b.grad = grad.to(dtype), grad.clone()
        opt.step()
        ropt.step()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"].double(), ropt.state[b]["exp_avg_sq"], atol=tol, rtol=tol)
        assert opt.state[a]["step"].item() == ropt.state[b]["step"].item() == 5


def test_skips_parameters_without_grad():
    p, q = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = tessera.optim.AdamW([p, q], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(q, torch.ones(3)) and q not in opt.state
    assert not torch.equal(p, torch.ones(3))


def test_sharded_unit_uses_flat_state_and_matches_torch(single_rank_group):
    # One rank, FULL_SHARD: the shards alias the flat buffer, so one fused call covers the unit; the result must
    # equal torch.optim.AdamW on an identical unsharded copy, including param groups that split the unit.
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    model.load_state_dict(ref.state_dict())
    tessera.shard(model)
    names = [n for n, _ in ref.named_parameters()]
    decay = [p for n, p in zip(names, model.parameters()) if "weight" in n]
    no_decay = [p for n, p in zip(names, model.parameters()) if "weight" not in n]
    rdecay = [p for n, p in ref.named_parameters() if "weight" in n]
    rno = [p for n, p in ref.named_parameters() if "weight" not in n]
    opt = tessera.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.01,
                              weight_decay=0.2)
    ropt = torch.optim.AdamW([{"params": rdecay}, {"params": rno, "weight_decay": 0.0}], lr=0.01,
                             weight_decay=0.2, foreach=False)
    x = torch.randn(6, 5)
    for _ in range(3):
        model(x).square().mean().backward()
        ref(x).square().mean().backward()
        opt.step()
        ropt.step()
        opt.zero_grad()
        ropt.zero_grad()
    got = tessera.full_state_dict(model)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5)
