"""Named sizes: parameter counts equal the published ones; FLOPs per token by the PaLM formula."""

from __future__ import annotations

import pytest
import torch

import tessera
import tessera.models as tm
from tessera.models.llama.args import LLAMA_CONFIGS
from tessera.models.mistral.args import MISTRAL_CONFIGS


@pytest.mark.parametrize("name", sorted([*LLAMA_CONFIGS, *MISTRAL_CONFIGS]))
def test_parameter_count_equals_published(name):
    spec = tm.get(name)
    model = spec.build(device="meta")  # shapes only
    counted = sum(p.numel() for p in model.parameters())  # a tied embedding/head once
    assert counted == spec.published_params
    assert spec.config.num_params() == counted


def test_family_features_of_named_sizes():
    assert tm.get("mistral-7b-v0.1").config.sliding_window == 4096
    assert tm.get("mistral-7b-v0.3").config.sliding_window is None
    assert tm.get("llama3.1-8b").config.rope_scaling.factor == 8.0
    assert tm.get("llama3.2-1b").config.tie_embeddings
    model = tm.get("smollm2-135m").build(device="meta")
    assert model.output.weight is model.tok_embeddings.weight
    assert type(tm.get("mistral-7b-v0.1").build(device="meta")).__name__ == "Mistral"


def test_flops_per_token_by_hand():
    """6 x (matmul weights, head included) + 12 x layers x heads x head_dim x seq, computed by hand for SmolLM2-135M:
    per layer q,o 576x576, k,v 576x192, MLP 3 x 576x1536; head 49152x576."""
    cfg = tm.get("smollm2-135m").config
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    want = 6 * (30 * per_layer + 49152 * 576) + 12 * 30 * 9 * 64 * 2048
    assert cfg.flops_per_token(2048) == want


def test_unknown_name_lists_known():
    with pytest.raises(tessera.InvalidArgumentError, match="unknown model 'llama9'.*smollm2-135m"):
        tm.get("llama9")


def test_bad_sizes_raise_naming_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tm.get("smollm2-135m").config.with_(n_kv_heads=4)
    with pytest.raises(ValueError, match="sliding_window"):
        tm.get("mistral-7b-v0.1").config.with_(sliding_window=0)


def test_sequence_past_max_seq_len_raises():
    model = tm.build(tm.get("smollm2-135m").config.with_(n_layers=1, dim=64, n_heads=2, n_kv_heads=1, ffn_dim=32,
                                                          max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
