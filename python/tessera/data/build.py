"""build_sft and build_text: from raw inputs to train / eval rows, the two data paths of the fine-tuning recipes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from tessera.data.chat import render_chat
from tessera.data.example import Example
from tessera.data.packing import PackedRows, pack
from tessera.data.sampler import split_heldout
from tessera.data.token_file import TokenFile, TokenFileError
from tessera.data.token_rows import TokenFileRows
from tessera.errors import InvalidArgumentError
from tessera.models.fetch.cache import locked

# Paragraphs are joined into documents of up to this many characters (about 1,000 tokens at 4 chars/token): long
# enough for context, short enough that a seq_len row holds whole documents.
DOC_CHARS = 4000
# Bump when the text -> documents rule changes: token files built by another version are rebuilt.
TEXT_VERSION = 1


def pad_token_id(tokenizer) -> int:
    """tokenizer.pad_token_id, else its eos_token_id; InvalidArgumentError when it has neither."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise InvalidArgumentError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos "
                               "token; padding needs one of them")


def build_sft(conversations, tokenizer, *, seq_len: int, train_on: str = "assistant", eval_fraction: float = 0.05,
              seed: int = 0) -> tuple[PackedRows, PackedRows | None, dict]:
    """Splits `conversations` (lists of {"role", "content"} dicts) into train / eval (split_heldout, before
    packing), renders each with render_chat and packs each side into rows of seq_len positions.

    Returns (train_rows, eval_rows or None when eval_fraction == 0, stats) with stats: conversations,
    train_conversations, eval_conversations, train_rows, eval_rows, tokens (all rendered tokens), label_tokens and
    eval_label_tokens (trained positions after shifting), truncated, dropped (both sides).
    Raises InvalidArgumentError naming the conversation when one cannot be rendered."""
    pad_id = pad_token_id(tokenizer)
    train_idx, eval_idx = split_heldout(len(conversations), eval_fraction, seed=seed)

    def render(indices: list[int]) -> list[Example]:
        out = []
        for i in indices:
            try:
                out.append(render_chat(tokenizer, conversations[i], train_on=train_on))
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"build_sft: conversation {i}: {e}") from None
        return out

    train_ex, eval_ex = render(train_idx), render(eval_idx)
    train = pack(train_ex, seq_len, pad_id=pad_id)
    heldout = pack(eval_ex, seq_len, pad_id=pad_id) if eval_fraction > 0 else None
    stats = {
        "conversations": len(conversations), "train_conversations": len(train_idx),
        "eval_conversations": len(eval_idx), "train_rows": len(train), "eval_rows": len(heldout) if heldout else 0,
        "tokens": sum(len(e.input_ids) for e in train_ex + eval_ex), "label_tokens": train.num_label_tokens,
        "eval_label_tokens": heldout.num_label_tokens if heldout else 0,
        "truncated": train.truncated + (heldout.truncated if heldout else 0),
        "dropped": train.dropped + (heldout.dropped if heldout else 0),
    }
    return train, heldout, stats


def split_documents(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """`text` split on blank lines into paragraphs, consecutive paragraphs joined (by a blank line) into documents
    of up to max_chars characters; a longer paragraph is a document of its own."""
    docs: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if docs and len(docs[-1]) + 2 + len(para) <= max_chars:
            docs[-1] += "\n\n" + para
        else:
            docs.append(para)
    return docs


def _fingerprint(paths: Sequence[str], tokenizer, eval_fraction: float, seed: int) -> dict:
    """What a cached token file must have been built from: each input's resolved path, size and mtime, the
    tokenizer (name, size, a hash of its vocabulary and its eos id), the split and the text rule."""
    files = []
    for p in paths:
        st = os.stat(p)
        files.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return {"files": files, "tokenizer": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(tokenizer),
            "vocab_sha256": hashlib.sha256(vocab).hexdigest(), "eos_id": tokenizer.eos_token_id,
            "eval_fraction": eval_fraction, "seed": seed, "text_version": TEXT_VERSION, "doc_chars": DOC_CHARS}


def _open_or_build(paths, tokenizer, cache_path, meta: dict, eval_fraction: float, seed: int):
    """(TokenFile, reused): the token file at cache_path when its fingerprint is `meta`, else a new one."""
    try:
        tf = TokenFile(cache_path)
        if tf.meta.get("fingerprint") == meta:
            return tf, True
    except TokenFileError:
        pass  # absent or damaged: rebuilt below
    docs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            docs += split_documents(f.read())
    if not docs:
        raise InvalidArgumentError(f"build_text: {list(paths)} hold no text")
    train_idx, eval_idx = split_heldout(len(docs), eval_fraction, seed=seed)
    eos = tokenizer.eos_token_id
    tokens = (tokenizer(docs[i], add_special_tokens=False, verbose=False)["input_ids"] + [eos]
              for i in train_idx + eval_idx)
    tf = TokenFile.write(cache_path, tokens, vocab_size=len(tokenizer),
                         meta={"fingerprint": meta, "train_docs": len(train_idx), "eval_docs": len(eval_idx)})
    return tf, False


def build_text(paths: Sequence[str], tokenizer, *, seq_len: int, cache_path: str, eval_fraction: float = 0.05,
               seed: int = 0) -> tuple[TokenFileRows, TokenFileRows | None, dict]:
    """Continued pretraining data: the files `paths` (UTF-8 text) split into documents (split_documents), each
    tokenized without special tokens plus the eos token, written once to the TokenFile `cache_path` with the train
    documents first and the held-out ones (split_heldout over documents) after them; reused while its fingerprint
    (inputs' paths, sizes, mtimes, tokenizer, split) matches. Rows of seq_len positions over each part.

    Returns (train_rows, eval_rows or None when eval_fraction == 0, stats) with stats: documents, train_docs,
    eval_docs, tokens, train_rows, eval_rows, label_tokens, eval_label_tokens, reused (bool).
    Raises InvalidArgumentError when there are no documents, the tokenizer has no eos token, or a part is too short
    for one row of seq_len + 1 tokens."""
    if not paths:
        raise InvalidArgumentError("build_text: no input files given")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidArgumentError(f"build_text: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos "
                                   "token to end documents with")
    meta = _fingerprint(paths, tokenizer, eval_fraction, seed)
    # One rank tokenizes; the others wait and reuse its token file instead of reading one being replaced.
    with locked(Path(str(cache_path) + ".lock")):
        tf, reused = _open_or_build(paths, tokenizer, cache_path, meta, eval_fraction, seed)
    n_train, n_eval = tf.meta["train_docs"], tf.meta["eval_docs"]
    train = TokenFileRows(tf, seq_len, (0, n_train))
    heldout = TokenFileRows(tf, seq_len, (n_train, n_train + n_eval)) if eval_fraction > 0 else None
    for name, rows in (("train", train), ("eval", heldout)):
        if rows is not None and len(rows) == 0:
            raise InvalidArgumentError(f"build_text: the {name} part of {list(paths)} has {rows.num_tokens} tokens, "
                                       f"fewer than one row of seq_len + 1 = {seq_len + 1}; use more text, a shorter "
                                       "seq_len or a larger eval_fraction")
    stats = {"documents": n_train + n_eval, "train_docs": n_train, "eval_docs": n_eval, "tokens": tf.num_tokens,
             "train_rows": len(train), "eval_rows": len(heldout) if heldout else 0,
             "label_tokens": train.num_label_tokens, "eval_label_tokens": heldout.num_label_tokens if heldout else 0,
             "reused": reused}
    return train, heldout, stats
