"""A llama-architecture GGUF file (llama.cpp) -> a Hugging Face Llama directory in float32.

Writes model.safetensors (float32, metadata {"format": "pt"}), config.json, generation_config.json, tokenizer.json
and tokenizer_config.json (with the chat template), which transformers' LlamaForCausalLM / AutoTokenizer and
tessera.models.load_hf read.

[Note: GGUF q/k un-permute]
llama.cpp's convert_hf_to_gguf.py reorders the rows of q_proj and k_proj within each head, so that its RoPE can
rotate adjacent pairs (x[2i], x[2i+1]): permute(w) = w.reshape(n_head, 2, head_dim//2, in).swapaxes(1, 2).
HF Llama rotates halves (x[i], x[i + head_dim/2]) and wants the original order back; the inverse is
w.reshape(n_head, head_dim//2, 2, in).swapaxes(1, 2), with n_head = the KV head count for k_proj. Without it the
model still loads but rotates the wrong pairs of dimensions: on SmolLM2 the loss on a plain English paragraph goes
from 2.5 to 3.8 (tests/python/models/test_fetch.py checks both this and transformers' own GGUF loader).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tessera.errors import FetchError, NotSupportedError
from tessera.models.fetch.cache import Log, mb

# GGUF tensor names of one block -> HF names under model.layers.N.
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GGUF tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies (src/llama-vocab.cpp): "smollm" splits every digit
# on its own (\p{N}) before the GPT-2 regex, as SmolLM2's original tokenizer.json does.
_PRE_TOKENIZERS = {"smollm": True, "gpt2": False}  # name -> split digits individually first

_TOKEN_TYPE_CONTROL = 3  # gguf.TokenType.CONTROL: special tokens (<|im_start|> ...)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise FetchError(f"{reader.data.filename}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _f32_round(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (GGUF stores 1e-5 as 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def read_config(reader) -> dict[str, Any]:
    """HF LlamaConfig fields from the GGUF metadata. Raises NotSupportedError for other architectures or RoPE
    scaling, which this converter does not translate."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotSupportedError(f"{reader.data.filename}: GGUF architecture {arch!r}; only 'llama' is converted")
    if f"{arch}.rope.scaling.type" in reader.fields:
        raise NotSupportedError(f"{reader.data.filename}: RoPE scaling in the GGUF is not converted")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // heads))
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    theta = _f32_round(_field(reader, "llama.rope.freq_base"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "vocab_size": int(_field(reader, "llama.vocab_size", n_tokens)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        # Both spellings: transformers 4 reads rope_theta, transformers 5 rope_parameters; a reader that finds
        # neither silently falls back to 10000 (see /work/shared/REAL_INPUTS.md).
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_scaling": None,
        "rms_norm_eps": _f32_round(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id",
                                   _field(reader, "tokenizer.ggml.eos_token_id"))),
        "use_cache": True,
        "torch_dtype": "float32",
    }


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row permutation of q_proj / k_proj (see [Note: GGUF q/k un-permute]).
    w: [n_head * head_dim, in] -> same shape, rows in HF's rotate-half order."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, f, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    block = {"input_layernorm": (h,), "post_attention_layernorm": (h,), "self_attn.q_proj": (q, h),
             "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
             "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in block.items()})
    return shapes


def hf_name(gguf_name: str) -> str:
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"; FetchError for a name not in the map."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if suffix == "weight" and len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.weight"
    if suffix == "weight" and stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.weight"
    raise FetchError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart in this converter")


def read_state_dict(reader, cfg: dict[str, Any], log: Log) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantized to float32 (C-contiguous numpy) under its HF name, q/k un-permuted. Checks
    that exactly the tensors of `cfg` are there, with their shapes, naming any that are missing, extra or wrong."""
    from gguf import quants

    start = time.monotonic()
    expected = _expected_shapes(cfg)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope(w, cfg["num_key_value_heads"])
        if name not in expected:
            raise FetchError(f"GGUF tensor {t.name!r} ({name}) is not part of a {cfg['num_hidden_layers']}-layer "
                             f"{'tied' if cfg['tie_word_embeddings'] else 'untied'} Llama")
        if tuple(w.shape) != expected[name]:
            raise FetchError(f"GGUF tensor {t.name!r} ({name}): shape {tuple(w.shape)}, expected {expected[name]} "
                             "from the GGUF metadata")
        out[name] = np.ascontiguousarray(w)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise FetchError(f"the GGUF file lacks {len(missing)} tensors: {missing[:5]}")
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    log(f"dequantized {len(out)} tensors ({'/'.join(kinds)}) to float32: "
        f"{mb(sum(a.nbytes for a in out.values()))} in {time.monotonic() - start:.1f} s")
    return out


def write_tokenizer(reader, cfg: dict[str, Any], out_dir: Path) -> None:
    """tokenizer.json (byte-level BPE built with the `tokenizers` library from the GGUF vocabulary and merges, with
    llama.cpp's pre-tokenizer for tokenizer.ggml.pre) and tokenizer_config.json (special tokens, chat template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise NotSupportedError(f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r}; converted: 'gpt2' (byte-level "
                                f"BPE) with {sorted(_PRE_TOKENIZERS)}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if _PRE_TOKENIZERS[pre] else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_CONTROL])
    tok.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str:
        return tokens[cfg[key]]

    tokenizer_config = {
        # The generic fast tokenizer: it loads tokenizer.json as written (transformers 4 and 5).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("pad_token_id"),
        "unk_token": tokens[int(_field(reader, "tokenizer.ggml.unknown_token_id"))],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def convert(gguf_path: Path, out_dir: Path, log: Log) -> dict[str, Any]:
    """Writes the HF Llama directory for gguf_path into out_dir (see the module docstring); returns the config."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    start = time.monotonic()
    reader = GGUFReader(str(gguf_path))
    cfg = read_config(reader)
    log(f"read {gguf_path.name}: {len(reader.tensors)} tensors, {cfg['num_hidden_layers']} layers, hidden "
        f"{cfg['hidden_size']}, vocab {cfg['vocab_size']} ({time.monotonic() - start:.1f} s)")
    state = read_state_dict(reader, cfg, log)
    start = time.monotonic()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    log(f"wrote model.safetensors: {mb((out_dir / 'model.safetensors').stat().st_size)} in "
        f"{time.monotonic() - start:.1f} s")
    del state
    start = time.monotonic()
    _write_json(out_dir / "config.json", cfg)
    _write_json(out_dir / "generation_config.json", {k: cfg[k] for k in ("bos_token_id", "eos_token_id",
                                                                          "pad_token_id")})
    write_tokenizer(reader, cfg, out_dir)
    log(f"wrote config.json, generation_config.json, tokenizer.json, tokenizer_config.json in "
        f"{time.monotonic() - start:.1f} s")
    return cfg
