"""The Mistral family's typed config: a Llama architecture with sliding-window attention (v0.1) and a 32k vocab."""

from __future__ import annotations

from dataclasses import dataclass

from tessera.models.llama.args import LlamaConfig


@dataclass(kw_only=True)
class MistralConfig(LlamaConfig):
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 14336
    rope_theta: float = 10000.0
    max_seq_len: int = 32768
    sliding_window: int | None = 4096

    family = "mistral"


MISTRAL_CONFIGS = {
    "mistral-7b-v0.1": lambda: MistralConfig(),
    "mistral-7b-v0.3": lambda: MistralConfig(vocab_size=32768, rope_theta=1e6, sliding_window=None),
}

# Parameter counts of the released checkpoints (Hugging Face model pages, from the safetensors headers).
PUBLISHED_PARAMS = {
    "mistral-7b-v0.1": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
}
