"""pack: tokenized documents into fixed-length rows of shifted (input, target) positions, several documents a row.

[Note: packing]
A document of n tokens x[0..n-1] gives n-1 positions: input x[t], target x[t+1], trained when the target token is
(its label in the Example is not -100). Documents go into rows in order, greedily: a document that does not fit in
the rest of the current row starts a new one; documents are never split across rows, so a row's attention (through
doc_ids) sees each document from its first token. A document with more than seq_len positions is truncated to
its first seq_len (counted in `truncated`). Documents with no trained target after shifting are dropped (counted
in `dropped`): they would cost compute and teach nothing. The rest of a row is padding: input pad_id, label -100,
and a doc id of its own, so real tokens never attend to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tessera.data.batch import Batch
from tessera.data.example import IGNORE_INDEX, Example
from tessera.errors import InvalidArgumentError


class PackedRows:
    """In-memory packed rows: input_ids, labels (shifted) and doc_ids, each np.int64 [num_rows, seq_len].

    Attributes: seq_len, truncated (documents cut to seq_len positions), dropped (documents with nothing to
    train), num_docs (documents placed), num_tokens (non-padding positions). len(rows) is the number of rows;
    rows.batch(indices) gathers a Batch."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, doc_ids: np.ndarray, *, seq_len: int,
                 truncated: int = 0, dropped: int = 0, num_docs: int = 0, num_tokens: int = 0) -> None:
        for name, a in (("input_ids", input_ids), ("labels", labels), ("doc_ids", doc_ids)):
            if a.ndim != 2 or a.shape[1] != seq_len or a.shape != input_ids.shape:
                raise InvalidArgumentError(f"PackedRows: {name} has shape {a.shape}; expected "
                                           f"[{input_ids.shape[0]}, {seq_len}]")
        self.input_ids, self.labels, self.doc_ids = input_ids, labels, doc_ids
        self.seq_len, self.truncated, self.dropped, self.num_docs = seq_len, truncated, dropped, num_docs
        self.num_tokens = num_tokens  # non-padding positions

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_label_tokens(self) -> int:
        """Trained positions (labels != -100) over all rows."""
        return int((self.labels != IGNORE_INDEX).sum())

    def batch(self, indices: Sequence[int]) -> Batch:
        """The rows `indices` (list of ints in [0, len(self))) as a Batch of int64 tensors [len(indices), seq_len],
        copies that share storage with nothing (not with the rows, nor with each other).
        Raises InvalidArgumentError for an out-of-range index or an empty list."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size == 0:
            raise InvalidArgumentError("PackedRows.batch: no row indices given")
        if idx.min() < 0 or idx.max() >= len(self):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise InvalidArgumentError(f"PackedRows.batch: row {bad} out of range [0, {len(self)})")
        # Integer-array indexing copies (a slice would be a view of the rows).
        return Batch(torch.from_numpy(self.input_ids[idx]), torch.from_numpy(self.labels[idx]),
                     torch.from_numpy(self.doc_ids[idx]))


def _positions(ex: Example, seq_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(inputs, shifted labels) int64 [min(n-1, seq_len)] of one document, and whether it was truncated."""
    ids = np.asarray(ex.input_ids, dtype=np.int64)
    labels = np.asarray(ex.labels, dtype=np.int64)
    n = max(ids.size - 1, 0)
    keep = min(n, seq_len)
    return ids[:keep], labels[1:keep + 1], n > seq_len


def pack(examples: Sequence[Example], seq_len: int, *, pad_id: int) -> PackedRows:
    """Packs `examples` into rows of seq_len positions (see [Note: packing]).

    Returns PackedRows with input_ids / labels / doc_ids np.int64 [num_rows, seq_len]; doc ids count 0, 1, ...
    within each row, padding takes the next one. Raises InvalidArgumentError for seq_len < 1 or a negative pad_id."""
    if seq_len < 1:
        raise InvalidArgumentError(f"pack: seq_len={seq_len}, expected >= 1")
    if pad_id is None or pad_id < 0:
        raise InvalidArgumentError(f"pack: pad_id={pad_id}, expected a token id >= 0")
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = seq_len  # positions filled in the current row; seq_len forces a new row for the first document
    truncated = dropped = placed = tokens = 0
    for ex in examples:
        inputs, labels, cut = _positions(ex, seq_len)
        if not np.any(labels != IGNORE_INDEX):
            dropped += 1
            continue
        truncated += cut
        if used + inputs.size > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((inputs, labels))
        used += inputs.size
        placed += 1
        tokens += inputs.size
    out_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    out_labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    out_docs = np.empty((len(rows), seq_len), dtype=np.int64)
    for r, docs in enumerate(rows):
        at = 0
        for d, (inputs, labels) in enumerate(docs):
            out_ids[r, at:at + inputs.size] = inputs
            out_labels[r, at:at + inputs.size] = labels
            out_docs[r, at:at + inputs.size] = d
            at += inputs.size
        out_docs[r, at:] = len(docs)  # padding: a document of its own
    return PackedRows(out_ids, out_labels, out_docs, seq_len=seq_len, truncated=truncated, dropped=dropped,
                      num_docs=placed, num_tokens=tokens)
