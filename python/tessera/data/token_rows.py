"""TokenFileRows: fixed-length training rows read lazily, by offset, from a TokenFile (continued pretraining).

[Note: rows over a token stream]
The documents in doc_range, back to back, form one stream of L tokens starting at token S = offsets[a]. Row i
covers stream tokens [i*seq_len, i*seq_len + seq_len + 1): inputs are its first seq_len, targets its last seq_len
(consecutive rows share one token, so every stream token but the first is a target exactly once). There are
(L - 1) // seq_len rows; the tail that does not fill one is unused. doc_ids are the documents' indices in the
TokenFile, so attention (model.forward(..., doc_ids=...)) never crosses a document boundary, and a position whose
target is the first token of the next document is not trained (label -100): nothing in the document predicts it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tessera.data.batch import Batch
from tessera.data.example import IGNORE_INDEX
from tessera.data.token_file import TokenFile
from tessera.errors import InvalidArgumentError


class TokenFileRows:
    """Rows of seq_len positions over the documents doc_range = (first, end) of `tf` (default: all), see
    [Note: rows over a token stream]. len(rows) rows; rows.batch(indices) -> Batch of int64 [len(indices), seq_len].

    Raises InvalidArgumentError for seq_len < 1, a doc_range outside [0, tf.num_docs] or reversed."""

    def __init__(self, tf: TokenFile, seq_len: int, doc_range: tuple[int, int] | None = None) -> None:
        if seq_len < 1:
            raise InvalidArgumentError(f"TokenFileRows: seq_len={seq_len}, expected >= 1")
        first, end = doc_range if doc_range is not None else (0, tf.num_docs)
        if not 0 <= first <= end <= tf.num_docs:
            raise InvalidArgumentError(f"TokenFileRows: doc_range ({first}, {end}) is not inside [0, "
                                       f"{tf.num_docs}] of {tf.path}")
        self.tf, self.seq_len, self.doc_range = tf, seq_len, (first, end)
        self.start = int(tf.offsets[first])  # stream token 0 in the file
        self.num_tokens = int(tf.offsets[end]) - self.start
        self.num_rows = max(self.num_tokens - 1, 0) // seq_len
        # Document starts relative to the stream's start (equal for an empty document and the one after it).
        self._starts = tf.offsets[first:end + 1] - self.start

    def __len__(self) -> int:
        return self.num_rows

    @property
    def num_label_tokens(self) -> int:
        """Trained positions over all rows: every position except those whose target starts a new document."""
        covered = self.num_rows * self.seq_len
        b = np.unique(self._starts)
        crossings = np.count_nonzero((b >= 1) & (b <= covered) & (b < self.num_tokens))
        return covered - int(crossings)

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        begin = i * self.seq_len
        tokens = self.tf.read(self.start + begin, self.seq_len + 1)
        # Document of each stream position: the last document starting at or before it (side="right" skips empty
        # documents, which share their start with the next one).
        doc = np.searchsorted(self._starts, np.arange(begin, begin + self.seq_len + 1), side="right") - 1
        doc = doc + self.doc_range[0]
        labels = np.where(doc[1:] == doc[:-1], tokens[1:], IGNORE_INDEX)
        return tokens[:-1], labels, doc[:-1]

    def batch(self, indices: Sequence[int]) -> Batch:
        """Rows `indices` (list of ints in [0, len(self))) as a Batch of int64 tensors [len(indices), seq_len],
        new arrays that share storage with nothing (np.stack copies).
        Raises InvalidArgumentError for an out-of-range index or an empty list."""
        indices = list(indices)
        if not indices:
            raise InvalidArgumentError("TokenFileRows.batch: no row indices given")
        for i in indices:
            if not 0 <= i < self.num_rows:
                raise InvalidArgumentError(f"TokenFileRows.batch: row {i} out of range [0, {self.num_rows}) of "
                                           f"{self.tf.path} docs {self.doc_range}")
        parts = [self._row(int(i)) for i in indices]
        return Batch(*(torch.from_numpy(np.stack([p[k] for p in parts])) for k in range(3)))
