"""Bad input to load_hf/save_hf: errors name the file or key and what was expected."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import make
from safetensors.torch import load_file, save_file

import tessera
import tessera.models as tm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make("llama_gqa_untied_rope_scaling", d)
    return d


def _copy(src, dst, *, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config:
        cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    sd = load_file(src / "model.safetensors")
    if tensors:
        tensors(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(tessera.InvalidArgumentError, match="not a directory"):
        tm.load_hf(tmp_path / "nope")
    with pytest.raises(tessera.InvalidArgumentError, match="no config.json"):
        tm.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(tessera.InvalidArgumentError, match="required field 'num_attention_heads' is missing"):
        tm.load_hf(tmp_path)


def test_no_weights(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(tessera.InvalidArgumentError, match="no model.safetensors.*pytorch_model.bin"):
        tm.load_hf(tmp_path)


def test_wrong_family(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "gpt2", config={"model_type": "gpt2"})
    with pytest.raises(tessera.InvalidArgumentError, match="model_type 'gpt2' is not supported.*llama.*mistral"):
        tm.load_hf(d)


def test_unsupported_features(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "bias", config={"attention_bias": True})
    with pytest.raises(tessera.NotSupportedError, match="attention_bias"):
        tm.load_hf(d)
    d = _copy(tiny_dir, tmp_path / "yarn", config={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(tessera.NotSupportedError, match="'yarn'"):
        tm.load_hf(d)


def test_missing_and_unexpected_tensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "missing", tensors=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(tessera.InvalidArgumentError, match="missing tensors 'model.layers.1.mlp.up_proj.weight'"):
        tm.load_hf(d)
    d = _copy(tiny_dir, tmp_path / "extra",
              tensors=lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    with pytest.raises(tessera.InvalidArgumentError, match="unexpected tensors 'model.layers.0.self_attn.q_proj.bias'"):
        tm.load_hf(d)


def test_config_that_does_not_match_the_weights(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "kv", config={"num_key_value_heads": 4})
    with pytest.raises(tessera.InvalidArgumentError,
                       match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\), but config.json "
                             r"implies \(32, 64\)"):
        tm.load_hf(d)
    d = _copy(tiny_dir, tmp_path / "layers", config={"num_hidden_layers": 3})
    with pytest.raises(tessera.InvalidArgumentError, match="missing tensors 'model.layers.2"):
        tm.load_hf(d)


def test_truncated_weights_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "trunc")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(tessera.InvalidArgumentError, match="not a readable safetensors file"):
        tm.load_hf(d)


def test_save_hf_of_a_plain_module_raises():
    with pytest.raises(tessera.InvalidArgumentError, match="without a model config"):
        tm.save_hf(torch.nn.Linear(2, 2), "/tmp/never-written")


def test_save_hf_splits_at_the_size_limit_and_loads_back(tiny_dir, tmp_path):
    """max_file_bytes small enough for several files: an index is written, the previous single file is removed,
    and load_hf reads the split set back equal."""
    import transformers

    model = tm.load_hf(tiny_dir)
    out = tmp_path / "split"
    tm.save_hf(model, out)
    files = tm.save_hf(model, out, max_file_bytes=40_000)
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()
    back = tm.load_hf(out)
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), ref(tokens).logits, rtol=0, atol=1e-5)


def test_save_hf_bf16(tiny_dir, tmp_path):
    model = tm.load_hf(tiny_dir)
    tm.save_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = tm.load_hf(tmp_path / "bf16")
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), n
