"""The Llama family's typed config and its named sizes (Llama 3.x and SmolLM2, which is a Llama architecture).

Every named size's parameter count is tested against the published one (tests/python/models/test_args.py); the
figures are the counts the Hugging Face model pages show for the released safetensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling ("rope_type": "llama3" in HF config.json): wavelengths longer than
    original_max_seq_len / low_freq_factor are divided by `factor`, those shorter than original_max_seq_len /
    high_freq_factor are kept, and the band between is interpolated. Source: Meta's llama-models reference
    (`apply_scaling`) and transformers' `_compute_llama3_parameters`."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(kw_only=True)
class LlamaConfig:
    """A Llama-architecture decoder: sizes in elements, `max_seq_len` in tokens.

    `head_dim` None means dim // n_heads. `sliding_window` (tokens, None: full causal attention) is Mistral's:
    query i attends keys j with i - sliding_window < j <= i. `hf_extra` carries HF config.json fields tessera does not
    use (token ids, ...) from load_hf to save_hf."""

    vocab_size: int = 128256
    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None
    ffn_dim: int = 8192
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    sliding_window: int | None = None
    hf_extra: dict = field(default_factory=dict, compare=False, repr=False)

    family = "llama"  # the key in tessera.models' registry and HF's model_type

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be > 0, got {getattr(self, name)}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"{type(self).__name__}: dim {self.dim} must be divisible by n_heads {self.n_heads} "
                             "(or give head_dim)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{type(self).__name__}: n_heads {self.n_heads} must be divisible by n_kv_heads "
                             f"{self.n_kv_heads} (grouped-query attention)")
        if self.hd % 2:
            raise ValueError(f"{type(self).__name__}: head_dim {self.hd} must be even (rotary embeddings)")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"{type(self).__name__}: sliding_window must be > 0 or None, got {self.sliding_window}")

    @property
    def hd(self) -> int:
        """The attention head size."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def with_(self, **changes) -> "LlamaConfig":
        return replace(self, **changes)

    # ---- sizes -----------------------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Parameters, counting a tied embedding/head once."""
        emb = self.vocab_size * self.dim
        return self.n_layers * self._layer_params() + emb * (1 if self.tie_embeddings else 2) + self.dim

    def _layer_params(self) -> int:
        attn = self.dim * self.hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        return attn + 3 * self.dim * self.ffn_dim + 2 * self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len` (tokens): 6 per weight of
        every matmul (the head included, tied or not; the embedding lookup is free) plus 12 * layers * heads *
        head_dim * seq_len for attention's two matmuls, without halving for the causal mask. Source: PaLM
        (Chowdhery et al. 2022) appendix B, as torchtitan's get_num_flop_per_token. MFU = tokens/s *
        flops_per_token / peak FLOP/s."""
        matmul = self.n_layers * (self._layer_params() - 2 * self.dim) + self.vocab_size * self.dim
        return 6.0 * matmul + 12.0 * self.n_layers * self.n_heads * self.hd * seq_len

    # ---- named sizes -----------------------------------------------------------------------------------------

    @staticmethod
    def tiny() -> "LlamaConfig":
        """The demo/benchmark model: small enough to train on 2 CPU ranks in seconds."""
        return LlamaConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688,
                           max_seq_len=256)

    @staticmethod
    def llama3_2_1b() -> "LlamaConfig":
        return LLAMA_CONFIGS["llama3.2-1b"]()


_LLAMA3_1_ROPE = RopeScaling(factor=8.0)
_LLAMA3_2_ROPE = RopeScaling(factor=32.0)

# name -> (config factory, published parameter count)
LLAMA_CONFIGS = {
    "llama3.2-1b": lambda: LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                       rope_scaling=_LLAMA3_2_ROPE, max_seq_len=131072, tie_embeddings=True),
    "llama3.2-3b": lambda: LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                                       rope_scaling=_LLAMA3_2_ROPE, max_seq_len=131072, tie_embeddings=True),
    "llama3.1-8b": lambda: LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                                       rope_scaling=_LLAMA3_1_ROPE, max_seq_len=131072),
    "llama3.1-70b": lambda: LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                                        rope_scaling=_LLAMA3_1_ROPE, max_seq_len=131072),
    "smollm2-135m": lambda: LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                        ffn_dim=1536, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "smollm2-360m": lambda: LlamaConfig(vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5,
                                        ffn_dim=2560, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "smollm2-1.7b": lambda: LlamaConfig(vocab_size=49152, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                                        ffn_dim=8192, rope_theta=130000.0, max_seq_len=8192, tie_embeddings=True),
}

# Parameter counts of the released checkpoints (the "Model size" the Hugging Face model pages show, summed from
# the safetensors headers).
PUBLISHED_PARAMS = {
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


def rope_inv_freq(cfg: LlamaConfig, device=None):
    """The rotary inverse frequencies, float32 [head_dim // 2], with Llama 3.1's scaling when configured."""
    import torch

    hd = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
