"""The rows a job trains and evaluates on, from data.source: chat conversations (SFT), plain text files (continued
pretraining) or the synthetic demo. Every rank builds the same rows (deterministic); rank 0 builds first so that
files cached on the way (corpora downloads, the token file) are written once."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from tessera.errors import InvalidArgumentError
from tessera.recipes.config import JobConfig


class SyntheticRows:
    """The demo data: rows that repeat a random 8-token pattern (learnable, so the loss visibly falls). Row i is a
    pure function of (seed, i). Same .batch() interface as tessera.data.PackedRows: one document per row."""

    def __init__(self, num_rows: int, seq_len: int, vocab_size: int, seed: int):
        self.num_rows, self.seq_len, self.vocab_size, self.seed = num_rows, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, indices: list[int]):
        from tessera.data import Batch

        rows = []
        for i in indices:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            pattern = torch.randint(0, self.vocab_size, (8,), generator=g)
            rows.append(pattern.repeat((self.seq_len + 1 + 7) // 8)[: self.seq_len + 1])
        x = torch.stack(rows)
        # clone, not contiguous(): a 1-row slice already counts as contiguous, and contiguous() would return views
        # of one storage (see [Note: batches are read-only] in tessera/data/batch.py).
        return Batch(input_ids=x[:, :-1].clone(), labels=x[:, 1:].clone(), doc_ids=torch.zeros_like(x[:, :-1]))


def check_source(cfg: JobConfig) -> None:
    """Fails early (before ranks start) for a data source that cannot work: a missing file, an unknown name."""
    src = cfg.data.source
    if src == "synthetic":
        return
    if src.startswith("text:"):
        paths = [p for p in src[len("text:"):].split(",") if p]
        if not paths:
            raise InvalidArgumentError("data.source text: needs at least one file, e.g. text:corpus.txt")
        for p in paths:
            if not os.path.isfile(p):
                raise InvalidArgumentError(f"data.source: text file {p} does not exist")
        return
    if src.endswith(".jsonl"):
        if not os.path.isfile(src):
            raise InvalidArgumentError(f"data.source: {src} does not exist")
        return
    known = ("chatterbot-corpus", "chitchat-dataset")
    if src not in known:
        raise InvalidArgumentError(f"data.source {src!r} is not known; expected one of {list(known)}, a .jsonl file "
                                   "of {\"messages\": [...]} lines, text:PATH[,PATH...], or synthetic")


def build_data(cfg: JobConfig, tokenizer, vocab_size: int, *, rank: int):
    """(train_rows, eval_rows or None, stats dict) for this job; collective (a barrier after rank 0 builds)."""
    d, t = cfg.data, cfg.training
    if d.source == "synthetic":
        n = max(t.steps * t.grad_accum * t.batch_size * dist.get_world_size(), 64)
        return (SyntheticRows(n, d.seq_len, vocab_size, t.seed), SyntheticRows(64, d.seq_len, vocab_size, t.seed + 1),
                {"train_rows": n, "eval_rows": 64})
    if len(tokenizer) > vocab_size:
        raise InvalidArgumentError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                                   f"{vocab_size}; use the model's own tokenizer (data.tokenizer)")
    out = None
    for turn in (0, 1):  # rank 0 first, then the others (from the cache rank 0 filled)
        if (rank == 0) == (turn == 0):
            out = _build(cfg, tokenizer)
        dist.barrier()
    return out


def _build(cfg: JobConfig, tokenizer):
    from tessera import data

    d, t = cfg.data, cfg.training
    if d.source.startswith("text:"):
        paths = [p for p in d.source[len("text:"):].split(",") if p]
        cache = os.path.join(cfg.output_dir, "data", "tokens")
        return data.build_text(paths, tokenizer, seq_len=d.seq_len, cache_path=cache,
                               eval_fraction=d.eval_fraction, seed=t.seed)
    convs = data.load_conversations(d.source, max_conversations=d.max_conversations or None)
    return data.build_sft(convs, tokenizer, seq_len=d.seq_len, train_on=d.train_on,
                          eval_fraction=d.eval_fraction, seed=t.seed)
