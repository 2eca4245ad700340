"""TokenFileRows: rows over a token file's document stream against a direct computation from the documents."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.data import IGNORE_INDEX, TokenFile, TokenFileRows
from tessera.errors import InvalidArgumentError


def direct_rows(docs: list[list[int]], first: int, end: int, seq_len: int):
    """(inputs, labels, doc_ids) per row, computed from the documents' token lists."""
    stream, owner = [], []
    for d in range(first, end):
        stream += docs[d]
        owner += [d] * len(docs[d])
    rows = []
    for i in range((len(stream) - 1) // seq_len):
        s = i * seq_len
        inputs = stream[s:s + seq_len]
        labels = [stream[s + t + 1] if owner[s + t + 1] == owner[s + t] else IGNORE_INDEX for t in range(seq_len)]
        rows.append((inputs, labels, owner[s:s + seq_len]))
    return rows


@pytest.mark.parametrize("doc_range", [None, (0, 5), (5, 12), (3, 3)])
def test_rows_match_direct_computation(tmp_path, doc_range):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=int(rng.integers(0, 30))).tolist() for _ in range(12)]
    docs[6] = []  # an empty document does not get positions
    tf = TokenFile.write(tmp_path / "c.tok", docs, vocab_size=1000)
    seq_len = 7
    rows = TokenFileRows(tf, seq_len, doc_range)
    first, end = doc_range or (0, 12)
    expected = direct_rows(docs, first, end, seq_len)
    assert len(rows) == len(expected)
    if not expected:
        return
    b = rows.batch(list(range(len(rows))))
    assert b.input_ids.tolist() == [e[0] for e in expected]
    assert b.labels.tolist() == [e[1] for e in expected]
    assert b.doc_ids.tolist() == [e[2] for e in expected]
    assert rows.num_label_tokens == b.num_label_tokens
    assert rows.batch([len(rows) - 1, 0]).input_ids.tolist() == [expected[-1][0], expected[0][0]]


def test_errors(tmp_path):
    tf = TokenFile.write(tmp_path / "c.tok", [[1, 2, 3, 4]], vocab_size=10)
    with pytest.raises(InvalidArgumentError, match=r"doc_range \(0, 2\) is not inside \[0, 1\]"):
        TokenFileRows(tf, 2, (0, 2))
    rows = TokenFileRows(tf, 2)
    assert len(rows) == 1
    with pytest.raises(InvalidArgumentError, match=r"row 1 out of range \[0, 1\)"):
        rows.batch([1])
