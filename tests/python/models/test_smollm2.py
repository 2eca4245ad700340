"""The real SmolLM2-135M-Instruct (fetched by `tessera fetch`, fp32) against transformers and one-process training:
logits, the loss on English text, greedy generation, and sharded training and export on 2 and 3 CPU ranks.

Costly tests: about 6 x 135e6 FLOPs per trained token on 2 cores, so sequences are short and steps few."""

from __future__ import annotations

import pytest
import torch
from conftest import run_ranks
from safetensors.torch import load_file

import tessera
import tessera.models as tm
from tessera.models.llama.model import cross_entropy

PROMPT = "What is the capital of France?"
# An ordinary English paragraph (written for this test).
PARAGRAPH = ("The village sits at the foot of a long green hill, where a narrow road winds up to an old stone "
             "church. Every morning the baker opens his shop before sunrise, and the smell of fresh bread drifts "
             "down the main street. Children walk to school in small groups, laughing and talking about the games "
             "they will play in the afternoon. In the summer, visitors come from the city to walk in the hills and "
             "to eat lunch at the small cafe by the river.")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(smollm2_dir):
    return tm.load_hf(smollm2_dir, dtype=torch.float32).eval()


def _chat_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return ids


def test_logits_equal_transformers(model, hf_model, tokenizer):
    ids = _chat_ids(tokenizer)
    with torch.no_grad():
        got, want = model(ids), hf_model(ids).logits
    assert got.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_mistral_layout_logits_equal_transformers(smollm2_mistral_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    mistral = tm.load_hf(smollm2_mistral_dir, dtype=torch.float32).eval()
    assert type(mistral).__name__ == "Mistral"
    ref = AutoModelForCausalLM.from_pretrained(smollm2_mistral_dir, dtype=torch.float32).eval()
    assert type(ref).__name__ == "MistralForCausalLM"
    ids = _chat_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(mistral(ids), ref(ids).logits, rtol=0, atol=1e-4)


def test_loss_on_english_paragraph(model, tokenizer):
    ids = tokenizer(PARAGRAPH, return_tensors="pt")["input_ids"]
    assert 60 <= ids.shape[1] <= 120
    with torch.no_grad():
        loss = cross_entropy(model(ids[:, :-1]), ids[:, 1:]).item()
    assert loss < 3.0, f"loss {loss:.3f} on plain English: the weights or the architecture are wrong"


def test_greedy_generation_equals_transformers(model, hf_model, tokenizer):
    from tessera.models.generate import generate_tokens

    ids = _chat_ids(tokenizer)
    want = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                             min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    got = generate_tokens(model, ids, max_new_tokens=32)
    assert got.shape == want.shape == (1, ids.shape[1] + 32)
    assert got.tolist() == want.tolist()
    assert "Paris" in tokenizer.decode(got[0, ids.shape[1]:])


# ---- sharded training -----------------------------------------------------------------------------------------

ROWS, SEQ, STEPS, LR = 6, 16, 3, 1e-4  # 6 rows: divisible by 2 and 3 ranks


def _batches(tokenizer) -> torch.Tensor:
    """[STEPS, ROWS, SEQ + 1] windows of the paragraph's tokens (repeated as needed)."""
    ids = tokenizer(PARAGRAPH)["input_ids"]
    need = STEPS * ROWS * (SEQ + 1)
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids).view(STEPS, ROWS, SEQ + 1)


def _one_process(smollm2_dir, batches) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = tm.load_hf(smollm2_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=False)
    losses = []
    for b in batches:
        loss = cross_entropy(model(b[:, :-1]), b[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters()}


def _sharded_rank(rank, world, smollm2_dir, batches, want_losses, out):
    import torch.distributed as dist

    model = tm.load_hf(smollm2_dir, dtype=torch.float32, shard=True)
    opt = tessera.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    per = ROWS // world
    for step, b in enumerate(batches):
        mine = b[rank * per:(rank + 1) * per]
        loss = cross_entropy(model(mine[:, :-1]), mine[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        got = total.item() / world  # equal row counts: the mean of the ranks' means is the global mean
        assert abs(got - want_losses[step]) <= 1e-5 * abs(want_losses[step]), (step, got, want_losses[step])
    tm.save_hf(model, out)


# 3 ranks only (uneven shards of every tensor); 2 ranks ran here too until CI time got tight (30 s of the real
# model); 2-rank sharded training is covered on the tiny HF models (test_hf_sharded.py) and by the recipe tests.
@pytest.mark.parametrize("world", [3])
def test_sharded_training_and_export_equal_one_process(world, smollm2_dir, tokenizer, tmp_path):
    batches = _batches(tokenizer)
    want_losses, want_state = _one_process(smollm2_dir, batches)
    assert want_losses[-1] < want_losses[0]  # it trains
    run_ranks(world, _sharded_rank, smollm2_dir, batches, want_losses, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    adapter = tm.FAMILIES["llama"].adapter
    assert sorted(saved) == sorted(adapter.to_hf(n) for n in want_state)
    # AdamW's step lr * m / (sqrt(v) + eps) has slope lr / eps = 1e4 in the gradient where |g| is near eps, so for
    # the few elements whose gradient is within rounding of zero (the sum over ranks vs over one batch differs by
    # ~1e-10) a step can differ by a good part of lr; measured: at most 0.35 lr in 3 steps, 2e-5 of the elements
    # off by more than 1e-6, mean difference 2e-9. Everything else must agree to float rounding.
    off, total, abs_sum = 0, 0, 0.0
    for name, want in want_state.items():
        diff = (saved[adapter.to_hf(name)] - want).abs()
        assert diff.max() <= STEPS * LR, (name, diff.max().item())
        off, total, abs_sum = off + int((diff > 1e-6).sum()), total + diff.numel(), abs_sum + diff.sum().item()
    assert off / total <= 2e-4 and abs_sum / total <= 2e-8, (off / total, abs_sum / total)
