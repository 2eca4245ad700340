"""load_hf/save_hf against transformers on tiny random models of both families: logits equal within 1e-5 (fp32),
tensors round-trip byte-equal, and what save_hf writes transformers loads to the same logits."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import CONFIGS, VOCAB, make
from safetensors.torch import load_file

import tessera.models as tm

SEQ = 12  # longer than the Mistral config's sliding window (5)


def _tokens(seed=1, batch=2, seq=SEQ):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_load_hf_logits_equal_transformers(name, tmp_path):
    ref = make(name, tmp_path)
    model = tm.load_hf(tmp_path)
    assert type(model).__name__ == ("Mistral" if name.startswith("mistral") else "Llama")
    tokens = _tokens()
    with torch.no_grad():
        got = model(tokens)
    want = _hf_logits(ref, tokens)
    assert got.shape == (2, SEQ, VOCAB)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_hf_round_trips_through_transformers(name, tmp_path):
    import transformers

    src, out = tmp_path / "src", tmp_path / "out"
    ref = make(name, src)
    model = tm.load_hf(src)
    tm.save_hf(model, out)
    # Byte-equal tensors under the same names, and no others.
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == type(ref).__name__
    tokens = _tokens(seed=2)
    torch.testing.assert_close(_hf_logits(back, tokens), _hf_logits(ref, tokens), rtol=0, atol=0)


def test_sliding_window_changes_the_logits(tmp_path):
    """The window is honoured, not ignored: without it the logits past the window differ (so the parity test above
    would catch a decoder that attends to everything)."""
    make("mistral_sliding_window", tmp_path)
    model = tm.load_hf(tmp_path)
    tokens = _tokens()
    with torch.no_grad():
        windowed = model(tokens)
        for layer in model.layers:
            layer.attention.window = None
        full = model(tokens)
    torch.testing.assert_close(windowed[:, :5], full[:, :5], rtol=0, atol=1e-6)
    assert (windowed[:, 5:] - full[:, 5:]).abs().max() > 1e-3


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    """Logits from prefill + one token at a time through the KV cache equal the full forward's, windowed too."""
    from tessera.models.llama.model import KVCache

    for name in ("llama_gqa_untied_rope_scaling", "mistral_sliding_window"):
        make(name, tmp_path / name)
        model = tm.load_hf(tmp_path / name)
        tokens = _tokens()
        with torch.no_grad():
            full = model(tokens)
            cache = KVCache(model.config, batch=2, max_len=SEQ, dtype=torch.float32)
            steps = [model(tokens[:, :4], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(4, SEQ)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
        assert cache.pos == SEQ


@pytest.mark.parametrize("name", ["llama_gqa_untied_rope_scaling", "mistral_sliding_window"])
def test_packed_documents_equal_documents_alone(name, tmp_path):
    """Packing with per-document isolation: with doc_ids, each document's logits inside a pack equal its logits
    alone (positions restart, attention never crosses documents; the Mistral window still applies, as a document
    of 7 tokens is longer than the window of 5)."""
    make(name, tmp_path)
    model = tm.load_hf(tmp_path)
    lengths = [5, 7, 4]
    docs = [_tokens(seed=10 + i, batch=1, seq=n) for i, n in enumerate(lengths)]
    pack = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = model(pack, doc_ids=doc_ids)
        unpacked = model(pack)  # without doc_ids the later documents see the earlier ones
        at = 0
        for doc in docs:
            n = doc.shape[1]
            torch.testing.assert_close(packed[:, at:at + n], model(doc), rtol=0, atol=1e-5)
            at += n
    assert (packed[:, 5:] - unpacked[:, 5:]).abs().max() > 1e-3
