"""A Llama-architecture decoder: RMSNorm, rotary embeddings (rotate-half layout, Llama 3.1 scaling), grouped-query
attention through SDPA (with Mistral's sliding window when configured), SwiGLU MLP, tied or untied head.

Plain torch; sharding is applied separately (parallelize.py), as in torchtitan. Module names follow torchtitan
(tok_embeddings, layers.N.attention.wq, ...); state_dict_adapter.py maps them to Hugging Face's. The rotary tables
are computed from positions on each forward (a few microseconds), so the module has no buffers and a model built
on the meta device needs only its parameters filled.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.models.llama.args import LlamaConfig, rope_inv_freq


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back (as HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32 [..., seq, head_dim], for integer `positions` [..., seq] (rotate-half layout: each
    frequency appears twice, in the first and the second half)."""
    freqs = positions[..., None].float() * rope_inv_freq(cfg, positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def packed_positions_and_mask(doc_ids: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed sequences, doc_ids int [batch, seq] (the document each token belongs to; a document's tokens are
    contiguous): positions [batch, seq] restarting at 0 at each document's first token, and a boolean attention
    mask [batch, 1, seq, seq] (True = attend) that is causal, never crosses documents, and honours `window`."""
    b, s = doc_ids.shape
    idx = torch.arange(s, device=doc_ids.device).expand(b, s)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=1).values
    i, j = idx[:, :, None], idx[:, None, :]
    mask = (j <= i) & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if window is not None:
        mask &= j > i - window
    return idx - start, mask[:, None]


def left_padded_positions_and_mask(pad: torch.Tensor, start: int, q_len: int,
                                   window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For a left-padded batch in a KVCache, pad int64 [batch] (row b's first pad[b] slots are padding): the
    positions [batch, q_len] of slots start..start+q_len-1 counted from each row's first real token (0 for pad
    slots), and a boolean mask [batch, 1, q_len, start + q_len] (True = attend) that is causal, skips pad slots
    and honours `window`. A pad slot attends only to itself, so no row of SDPA is fully masked (that gives NaN,
    and a NaN value times a zero weight would reach the real rows)."""
    i = torch.arange(start, start + q_len, device=pad.device)
    j = torch.arange(start + q_len, device=pad.device)
    positions = (i[None, :] - pad[:, None]).clamp(min=0)
    i, j = i[:, None], j[None, :]
    mask = (j <= i)[None] & (j[None] >= pad[:, None, None])
    if window is not None:
        mask &= (j > i - window)[None]
    mask |= (j == i)[None]
    return positions, mask[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [batch, heads, seq, head_dim] by position: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    if cos.dim() == 3:  # per-row positions [batch, seq, head_dim]: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of past positions for incremental decoding: per layer, [batch, n_kv_heads, max_len,
    head_dim]. `pos` (tokens) is how many positions are filled; the model advances it.

    dtype=None (the default) allocates each layer's buffers at its first write, in the dtype and on the device of
    the keys the layer computes: under mixed precision (a sharded model with bf16 compute over fp32 parameters)
    that is the compute dtype, which the parameters' dtype is not.

    pad (int64 [batch], optional): a left-padded batch, whose row b starts with pad[b] pad slots. The model then
    counts positions from each row's first real token and never attends to pad slots, so each row computes what it
    would alone (see left_padded_positions_and_mask)."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                 device=None, pad: torch.Tensor | None = None):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache: max_len {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        self.shape = (batch, cfg.n_kv_heads, max_len, cfg.hd)
        alloc = (lambda: torch.zeros(self.shape, dtype=dtype, device=device)) if dtype is not None else (lambda: None)
        self.k = [alloc() for _ in range(cfg.n_layers)]
        self.v = [alloc() for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.pos = 0
        if pad is not None and tuple(pad.shape) != (batch,):
            raise ValueError(f"KVCache: pad has shape {tuple(pad.shape)}; expected ({batch},), one count per row")
        self.pad = pad

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s (keys, values) buffers, allocated like `like` on first use."""
        if self.k[layer] is None:
            self.k[layer] = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
        return self.k[layer], self.v[layer]


def attention_mask(q_len: int, start: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean [q_len, start + q_len] mask (True = attend) for queries at positions start..start+q_len-1 over keys
    0..start+q_len-1: causal, and within `window` tokens (i - window < j) when given. None when SDPA's is_causal
    says the same (no cache offset, no window cutting in)."""
    if start == 0 and (window is None or q_len <= window):
        return None
    i = torch.arange(start, start + q_len, device=device)[:, None]
    j = torch.arange(start + q_len, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask &= j > i - window
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.window = cfg.sliding_window
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            ck, cv = cache.buffers(layer, k)
            ck[:, :, start:start + s] = k
            cv[:, :, start:start + s] = v
            k, v = ck[:, :, :start + s], cv[:, :, :start + s]
        if mask is None:  # else a packed-sequence mask (window included) from the model
            mask = attention_mask(s, start, self.window, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and s > 1,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """forward(tokens int64 [batch, seq], cache=None, *, doc_ids=None) -> logits [batch, seq, vocab] in the
    parameters' dtype.

    With a KVCache, tokens are the next positions after cache.pos, and the cache advances by seq. With doc_ids
    (int [batch, seq], packed sequences: the document of each token, each document contiguous), positions restart
    at every document and attention never crosses documents, so a document's logits in a pack equal its logits
    alone. With a KVCache that has `pad` (a left-padded batch), each row's positions start at its first real token
    and pad slots are never attended to. `config` is the model's LlamaConfig (or MistralConfig)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @property
    def cfg(self) -> LlamaConfig:
        return self.config

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        start = cache.pos if cache is not None else 0
        s = tokens.shape[1]
        if start + s > self.config.max_seq_len:
            raise ValueError(f"{type(self).__name__}: positions {start}..{start + s - 1} exceed max_seq_len "
                             f"{self.config.max_seq_len}")
        if cache is not None and start + s > cache.max_len:
            raise ValueError(f"KVCache: {start} + {s} tokens exceed its max_len {cache.max_len}")
        mask = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError(f"{type(self).__name__}: doc_ids (packed sequences) cannot be used with a KVCache")
            if doc_ids.shape != tokens.shape:
                raise ValueError(f"{type(self).__name__}: doc_ids has shape {tuple(doc_ids.shape)}; expected the "
                                 f"tokens' {tuple(tokens.shape)}")
            positions, mask = packed_positions_and_mask(doc_ids, self.config.sliding_window)
        elif cache is not None and cache.pad is not None:
            positions, mask = left_padded_positions_and_mask(cache.pad, start, s, self.config.sliding_window)
        else:
            positions = torch.arange(start, start + s, device=tokens.device)
        cos, sin = rope_cos_sin(self.config, positions)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, i, mask)
        if cache is not None:
            cache.pos += s
        return self.output(self.norm(h))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32: logits [batch, seq, vocab], targets int64 [batch, seq]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
