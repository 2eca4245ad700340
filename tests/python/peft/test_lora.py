"""tessera.peft LoRA: the math against a float64 reference, sharded LoRA training (2 and 3 gloo ranks) against
one-process LoRA training, adapters-only gradients and optimizer state, and the exports (peft adapter directory,
merged save_hf) against transformers + peft logits."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))  # hf_tiny

from conftest import run_ranks  # noqa: E402
from hf_tiny import VOCAB, make  # noqa: E402

import tessera  # noqa: E402
import tessera.models as tm  # noqa: E402
from tessera.models.registry import family_of  # noqa: E402
from tessera.shard.state_dict import units_in  # noqa: E402
from tessera.models.llama.model import cross_entropy  # noqa: E402
from tessera.peft import LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora, save_adapter  # noqa: E402

CFG = LoRAConfig(rank=4, alpha=8.0, targets=("wq", "wv", "wo", "w2"))
STEPS, LR, MAX_NORM = 3, 1e-2, 0.05


def _batches(world: int, per_rank: int = 2, seq: int = 10):
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (world * per_rank, seq + 1), generator=g) for _ in range(STEPS)]


def _lora_model(src, cfg=CFG):
    model = tm.load_hf(src)
    torch.manual_seed(7)  # every rank draws the same A
    return apply_lora(model, cfg)


def _train(model, opt, batches, rank=0, world=1):
    """STEPS AdamW steps with gradient clipping; returns the per-step mean loss over the global batch. Rank r trains on the r-th
    contiguous slice of each batch's rows (equal slices, so the mean of the ranks' means is the global mean)."""
    losses = []
    for tokens in batches:
        rows = tokens.shape[0] // world
        local = tokens[rank * rows:(rank + 1) * rows]
        loss = cross_entropy(model(local[:, :-1]), local[:, 1:])
        loss.backward()
        if world > 1:  # global norm over the adapters' shards; the frozen base has no gradients
            norm = tessera.clip_grad_norm_(model, MAX_NORM)
        else:
            norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_NORM)
        assert norm > MAX_NORM  # the clipping is exercised
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
    return losses


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state tensors, each storage counted once (tessera's AdamW keeps a unit's state as views
    of one flat buffer)."""
    seen = {}
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                s = v.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# ---- math ----------------------------------------------------------------------------------------------------

def test_lora_linear_matches_float64_reference():
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=False)
    m = LoRALinear(base, rank=4, alpha=8.0, dropout=0.0)
    assert m.weight is base.weight and not m.weight.requires_grad
    assert m.lora_A.shape == (4, 24) and m.lora_B.shape == (40, 4) and not m.lora_B.any()
    # kaiming_uniform(a=sqrt(5)) on [r, in]: bound 1/sqrt(in)
    assert m.lora_A.abs().max() <= 1 / math.sqrt(24) and m.lora_A.abs().max() > 0.5 / math.sqrt(24)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(3, 5, 24)
    W, A, B = (t.detach().double() for t in (m.weight, m.lora_A, m.lora_B))
    ref = x.double() @ W.T + 2.0 * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    m(x).sum().backward()
    assert m.weight.grad is None and m.lora_A.grad is not None and m.lora_B.grad is not None


def test_zero_b_gives_base_logits_exactly(tmp_path):
    make("llama_gqa_untied_rope_scaling", tmp_path)
    base = tm.load_hf(tmp_path)
    model = apply_lora(tm.load_hf(tmp_path), LoRAConfig(targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")))
    assert len(lora_modules(model)) == 7 * model.config.n_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert "layers.0.attention.wq.weight" in model.state_dict()  # base names unchanged
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))


# ---- sharded training equals one process -----------------------------------------------------------------------

def _sharded_vs_one_process(rank, world, src, strategy_name, via_load, out):
    batches = _batches(world)
    ref = _lora_model(src)
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_opt = tessera.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR)
    ref_losses = _train(ref, ref_opt, batches)

    strategy = tessera.ShardingStrategy[strategy_name]
    if via_load:  # adapters created unit by unit on the meta-device model while load_hf fills and shards it
        torch.manual_seed(7)
        model = tm.load_hf(src, shard=True, strategy=strategy, adapt=lambda m: apply_lora(m, CFG))
    else:
        model = _lora_model(src)
        family_of(model.config).parallelize(model, strategy=strategy)
    opt = tessera.optim.AdamW(model.parameters(), lr=LR)  # frozen shards included: they must get no state
    losses = _train(model, opt, batches, rank, world)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    # Only adapters: frozen shards have no gradient buffer and no optimizer state.
    loss = cross_entropy(model(batches[0][:2, :-1]), batches[0][:2, 1:])
    loss.backward()
    for name, p in model.named_parameters():
        is_adapter = name.endswith(("lora_A", "lora_B"))
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
        assert (p in opt.state) == is_adapter, name
    opt.zero_grad(set_to_none=True)
    full = tessera.full_state_dict(model)
    for k, v in full.items():
        if k.endswith(("lora_A", "lora_B")):
            torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(v, initial[k]), f"frozen {k} changed"
    save_adapter(model, out / "sharded")
    tm.save_hf(model, out / "merged_sharded", merge_adapters=True)
    if rank == 0:
        save_adapter(ref, out / "one_process")
        tm.save_hf(ref, out / "merged_one_process", merge_adapters=True)


@pytest.mark.parametrize("world,name,strategy,via_load", [
    (2, "llama_mha_tied_head_dim", "FULL_SHARD", False),
    (3, "mistral_sliding_window", "SHARD_GRAD_OP", True),
])
def test_sharded_lora_equals_one_process(world, name, strategy, via_load, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "src"
    make(name, src)
    run_ranks(world, _sharded_vs_one_process, src, strategy, via_load, tmp_path)
    a = load_file(tmp_path / "sharded" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one_process" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 2 * 4 * (3 if "mha" in name else 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    a = load_file(tmp_path / "merged_sharded" / "model.safetensors")
    b = load_file(tmp_path / "merged_one_process" / "model.safetensors")
    base = load_file(src / "model.safetensors")
    assert sorted(a) == sorted(b) == sorted(base)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # the merge changed the weight


def test_optimizer_state_only_for_adapters(tmp_path, single_rank_group):
    make("llama_gqa_untied_rope_scaling", tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 9))
    sizes = {}
    for use_lora in (False, True):
        model = _lora_model(tmp_path) if use_lora else tm.load_hf(tmp_path)
        family_of(model.config).parallelize(model, group=single_rank_group)
        opt = tessera.optim.AdamW(model.parameters(), lr=LR)
        cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        opt.step()
        sizes[use_lora] = state_bytes(opt)
        # exp_avg and exp_avg_sq, fp32, over each unit's trainable prefix (padding included) and nothing else
        prefix = sum(u.trainable_shard_numel for u in units_in(model))
        assert sizes[use_lora] == 2 * 4 * prefix, (use_lora, sizes[use_lora], prefix)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable <= prefix < trainable + 64 * len(units_in(model))
    print(f"AdamW state bytes: full fine-tune {sizes[False]}, LoRA {sizes[True]} "
          f"({sizes[False] / sizes[True]:.1f}x less)")
    assert sizes[True] < sizes[False] / 10


# ---- export ----------------------------------------------------------------------------------------------------

def test_peft_and_merged_exports_match_transformers(tmp_path):
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    src, adapter, merged = tmp_path / "src", tmp_path / "adapter", tmp_path / "merged"
    make("llama_gqa_untied_rope_scaling", src)
    model = _lora_model(src)
    opt = tessera.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    _train(model, opt, _batches(1))
    assert any(m.lora_B.abs().max() > 0 for m in lora_modules(model).values())
    save_adapter(model, adapter, base_model_name_or_path=str(src))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ours = model(tokens)
        hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(hf, adapter).eval()
        torch.testing.assert_close(peft_model(tokens).logits, ours, rtol=0, atol=1e-5)
        base_logits = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(tokens).logits
        assert (base_logits - ours).abs().max() > 1e-3  # the adapters changed something the check can see
    with pytest.raises(tessera.InvalidArgumentError, match="merge_adapters=True"):
        tm.save_hf(model, merged)  # unmerged adapters would be dropped silently
    tm.save_hf(model, tmp_path / "merged_on_write", merge_adapters=True)  # leaves the model as it is
    assert len(lora_modules(model)) == 4 * model.config.n_layers
    merge_lora(model)
    assert not lora_modules(model)
    tm.save_hf(model, merged)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ours, rtol=0, atol=1e-5)
        for d in (merged, tmp_path / "merged_on_write"):
            loaded = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
            torch.testing.assert_close(loaded(tokens).logits, ours, rtol=0, atol=1e-5)
    a, b = load_file(merged / "model.safetensors"), load_file(tmp_path / "merged_on_write" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # both add B @ A * s to W in float32


# ---- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=("wq", "q_proj")), "unknown targets \\['q_proj'\\]"),
    (dict(targets="wq"), "sequence of names"),
    (dict(targets=()), "targets is empty"),
    (dict(rank=0), "rank must be an integer > 0, got 0"),
    (dict(rank=-2), "rank must be an integer > 0, got -2"),
    (dict(rank=2.0), "rank must be an integer"),
    (dict(alpha=0.0), "alpha must be"),
    (dict(dropout=1.0), "dropout must be in \\[0, 1\\)"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(tessera.InvalidArgumentError, match=match):
        LoRAConfig(**kwargs)


def test_apply_twice_sharded_and_merge_errors(tmp_path, single_rank_group):
    make("llama_mha_tied_head_dim", tmp_path)
    model = _lora_model(tmp_path)
    with pytest.raises(tessera.StateError, match="already has LoRA adapters.*layers.0.attention.wq"):
        apply_lora(model, CFG)
    with pytest.raises(tessera.InvalidArgumentError, match="LoRAConfig"):
        apply_lora(tm.load_hf(tmp_path), {"rank": 4})
    with pytest.raises(tessera.InvalidArgumentError, match="no LoRA adapters"):
        merge_lora(tm.load_hf(tmp_path))
    with pytest.raises(tessera.InvalidArgumentError, match="no LoRA adapters"):
        save_adapter(tm.load_hf(tmp_path), tmp_path / "a")
    sharded = tm.load_hf(tmp_path, shard=True, group=single_rank_group)
    with pytest.raises(tessera.StateError, match="already sharded"):
        apply_lora(sharded, CFG)
    family_of(model.config).parallelize(model, group=single_rank_group)
    with pytest.raises(tessera.StateError, match="sharded"):
        merge_lora(model)


def test_adapters_drawn_in_module_order_whatever_the_targets_order(tmp_path):
    make("llama_mha_tied_head_dim", tmp_path)
    a = _lora_model(tmp_path, LoRAConfig(targets=("w2", "wq", "w1")))
    b = _lora_model(tmp_path, LoRAConfig(targets=("wq", "w1", "w2")))
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_hf_adapt_names_a_parameter_it_cannot_create(tmp_path):
    make("llama_mha_tied_head_dim", tmp_path)

    def add_param(model):
        model.layers[1].extra = nn.Parameter(torch.empty(3, device="meta"))

    with pytest.raises(tessera.InvalidArgumentError, match=r"\['layers.1.extra'\] are neither in the files"):
        tm.load_hf(tmp_path, adapt=add_param)


def _break_last_block(model, how):
    blk = model.layers[-1]
    if how == "not a Linear":
        blk.feed_forward.w2 = nn.Sequential(blk.feed_forward.w2)
    elif how == "missing":
        del blk.feed_forward.w2
    else:  # a linear with a bias
        w = blk.feed_forward.w2
        blk.feed_forward.w2 = nn.Linear(w.in_features, w.out_features, bias=True)


@pytest.mark.parametrize("how,match", [("not a Linear", r"layers.2.feed_forward.w2 is Sequential, expected nn.Linear"),
                                       ("missing", r"layers.2 has no \['feed_forward.w2'\]"),
                                       ("bias", r"has a bias")])
def test_rejected_apply_lora_changes_nothing(tmp_path, how, match):
    # The last block's w2 is bad; layers 0 and 1 come first, and must not have been adapted or frozen.
    make("llama_mha_tied_head_dim", tmp_path)
    model = tm.load_hf(tmp_path)
    _break_last_block(model, how)
    before = [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]
    types = [(n, type(m)) for n, m in model.named_modules()]
    rng = torch.get_rng_state()
    with pytest.raises(tessera.InvalidArgumentError, match=match) as err:
        apply_lora(model, LoRAConfig(targets=("wq", "w2")))
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, *_ in before]
    for (n, p, value, grad), (_, q) in zip(before, after):
        assert q is p and q.requires_grad == grad and torch.equal(q, value), n
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert not hasattr(model, "lora_config") and torch.equal(torch.get_rng_state(), rng)
    assert "nothing was changed" in str(err.value)


def test_rejected_merge_lora_changes_nothing(tmp_path):
    make("llama_mha_tied_head_dim", tmp_path)
    model = _lora_model(tmp_path)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_()
    lora_modules(model)["layers.2.feed_forward.w2"].lora_A = nn.Parameter(torch.zeros(3, 5))  # wrong shape
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"layers.2.feed_forward.w2 has .* \(3, 5\).* \(4, 96\).*nothing was merged"):
        merge_lora(model)
    assert len(lora_modules(model)) == 4 * model.config.n_layers
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_rejected_save_adapter_leaves_the_directory_as_it_was(tmp_path):
    make("llama_mha_tied_head_dim", tmp_path / "base")
    model = _lora_model(tmp_path / "base")
    out = save_adapter(model, tmp_path / "a", base_model_name_or_path=str(tmp_path / "base"))
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        next(iter(lora_modules(model).values())).lora_B.normal_()  # new weights that must not reach the files
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_adapter(model, out, base_model_name_or_path=object())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved
    with pytest.raises(tessera.InvalidArgumentError, match="dtype must be a floating-point"):
        save_adapter(model, out, dtype=torch.int8)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved
    save_adapter(model, out, base_model_name_or_path=tmp_path / "base")  # a Path is written as a string
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
