"""Hugging Face <-> tessera for the Llama family: parameter names and config.json.

Names: tessera uses torchtitan's module names; HF's LlamaForCausalLM uses its own. Both use the rotate-half RoPE
layout (tessera.models.llama.model.apply_rope), so q/k weights need no permutation and tensors round-trip
byte-equal. (Meta's original checkpoints use the interleaved layout; HF's conversion script permutes q and k by
heads. GGUF files are converted by tessera.models.fetch, which undoes llama.cpp's permutation.)
"""

from __future__ import annotations

import re

from tessera.errors import InvalidArgumentError, NotSupportedError
from tessera.models.llama.args import LlamaConfig, RopeScaling

# tessera name pattern -> HF name pattern, per layer ({i}) or global.
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_FROM_LAYER = {v: k for k, v in _LAYER.items()}
_FROM_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_TESSERA_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf(name: str) -> str:
    """tessera parameter name -> HF name; InvalidArgumentError for a name the Llama layout does not have."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _TESSERA_LAYER.match(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise InvalidArgumentError(f"parameter '{name}' is not part of tessera's Llama layout")


def from_hf(name: str) -> str | None:
    """HF parameter name -> tessera name, None for a name the Llama layout does not have (an unexpected key)."""
    if name in _FROM_GLOBAL:
        return _FROM_GLOBAL[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _FROM_LAYER:
        return f"layers.{m.group(1)}.{_FROM_LAYER[m.group(2)]}"
    return None


# ---- config.json ---------------------------------------------------------------------------------------------

def _rope_fields(hf: dict, path: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling from either transformers 4's (rope_theta, rope_scaling) or 5's
    rope_parameters."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        theta = 10000.0  # transformers' default when config.json names none
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise NotSupportedError(f"{path}: rope scaling type '{kind}' is not supported (tessera has 'llama3' and "
                                "none)")
    return float(theta), RopeScaling(factor=float(scaling["factor"]),
                                      low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                                      high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                                      original_max_seq_len=int(scaling.get("original_max_position_embeddings",
                                                                            8192)))


_USED = {"model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
         "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "sliding_window",
         "hidden_act", "attention_bias", "mlp_bias", "torch_dtype", "dtype", "transformers_version",
         "use_sliding_window", "attention_dropout", "initializer_range", "use_cache", "pretraining_tp"}


def config_kwargs_from_hf(hf: dict, path: str) -> dict:
    """LlamaConfig keyword arguments from an HF config.json dict (`path` names the file in errors).
    NotSupportedError for features tessera's decoder lacks (biases, another activation, another RoPE scaling)."""
    def need(key):
        if key not in hf:
            raise InvalidArgumentError(f"{path}: required field '{key}' is missing")
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        raise NotSupportedError(f"{path}: hidden_act '{hf['hidden_act']}' is not supported (expected 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise NotSupportedError(f"{path}: {key}=true is not supported (tessera's decoder has no biases)")
    theta, scaling = _rope_fields(hf, path)
    n_heads = int(need("num_attention_heads"))
    return dict(
        vocab_size=int(need("vocab_size")), dim=int(need("hidden_size")), n_layers=int(need("num_hidden_layers")),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None, ffn_dim=int(need("intermediate_size")),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hf_extra={k: v for k, v in hf.items() if k not in _USED},
    )


def config_from_hf(hf: dict, path: str) -> LlamaConfig:
    return LlamaConfig(**config_kwargs_from_hf(hf, path))


def config_to_hf(cfg: LlamaConfig, dtype_name: str) -> dict:
    """An HF config.json dict for `cfg` (LlamaForCausalLM). rope_theta is written out: transformers 5 writes
    rope_parameters instead, and a reader that knows only rope_theta would silently fall back to 10000."""
    out = dict(cfg.hf_extra)
    out.update(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.hd, intermediate_size=cfg.ffn_dim, vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype=dtype_name,
    )
    s = cfg.rope_scaling
    out["rope_scaling"] = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len}
    return out
