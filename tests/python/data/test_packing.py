"""pack and PackedRows: every document's positions and labels against a direct per-document computation, and the
packing test through a tiny tessera Llama: packed logits and loss equal each document run alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tessera.data import IGNORE_INDEX, Example, pack
from tessera.errors import InvalidArgumentError


def random_examples(seed: int, n: int, vocab: int, max_len: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, vocab, size=int(rng.integers(2, max_len + 1))).tolist()
        prompt = int(rng.integers(0, len(ids)))  # the first `prompt` tokens are not trained
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def expected_positions(ex: Example, seq_len: int) -> tuple[list[int], list[int]]:
    """The document's (inputs, targets) computed directly: position t predicts token t+1."""
    n = min(len(ex.input_ids) - 1, seq_len)
    inputs = ex.input_ids[:n]
    targets = [ex.input_ids[t + 1] if ex.labels[t + 1] != IGNORE_INDEX else IGNORE_INDEX for t in range(n)]
    return inputs, targets


def documents_in_rows(rows, pad_id: int) -> list[tuple[list[int], list[int]]]:
    """Each real document recovered from the rows by its doc id, in row order; checks on the way that each doc id
    covers contiguous positions, ids count up from 0 along a row, and padding (inputs == pad_id, which random
    documents never contain) is the row's last id with labels -100."""
    docs = []
    for r in range(len(rows)):
        ids, labels, doc = rows.input_ids[r], rows.labels[r], rows.doc_ids[r]
        assert doc[0] == 0 and np.all(np.diff(doc) >= 0) and np.all(np.diff(doc) <= 1)
        for d in np.unique(doc):
            sel = doc == d
            if np.all(ids[sel] == pad_id):
                assert d == doc.max() and np.all(labels[sel] == IGNORE_INDEX)
            else:
                assert not np.any(ids[sel] == pad_id)
                docs.append((ids[sel].tolist(), labels[sel].tolist()))
    return docs


def test_positions_labels_docids_against_each_document():
    seq_len = 32
    examples = random_examples(0, 50, 500, 45)  # some longer than seq_len + 1: truncated
    examples.append(Example([5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]))  # nothing trained: dropped
    examples.append(Example([5, 6], [5, IGNORE_INDEX]))  # only the first token trained: nothing after shift
    rows = pack(examples, seq_len, pad_id=0)
    kept = [ex for ex in examples if any(t != IGNORE_INDEX for t in expected_positions(ex, seq_len)[1])]
    assert rows.dropped == len(examples) - len(kept) >= 2
    assert rows.truncated == sum(len(ex.input_ids) - 1 > seq_len for ex in kept) > 0
    expected = [expected_positions(ex, seq_len) for ex in kept]
    assert documents_in_rows(rows, pad_id=0) == expected
    assert rows.num_tokens == sum(len(e[0]) for e in expected)
    assert rows.num_label_tokens == sum(sum(t != IGNORE_INDEX for t in e[1]) for e in expected)
    # Greedy: a row ends only when the next document does not fit.
    lengths = [len(e[0]) for e in expected]
    n_rows, used = 0, seq_len
    for n in lengths:
        if used + n > seq_len:
            n_rows, used = n_rows + 1, 0
        used += n
    assert len(rows) == n_rows


def test_batch_gathers_rows_as_int64_tensors():
    rows = pack(random_examples(1, 20, 100, 10), 16, pad_id=1)
    b = rows.batch([2, 0])
    for t in (b.input_ids, b.labels, b.doc_ids):
        assert t.dtype == torch.int64 and t.shape == (2, 16)
    assert b.input_ids[1].tolist() == rows.input_ids[0].tolist()
    assert b.num_label_tokens == int((rows.labels[[2, 0]] != IGNORE_INDEX).sum())
    with pytest.raises(InvalidArgumentError, match=r"row 99 out of range \[0, "):
        rows.batch([99])
    with pytest.raises(InvalidArgumentError, match=r"seq_len=0"):
        pack([], 0, pad_id=0)


def test_packed_batch_through_model_equals_documents_alone():
    from tessera.models.llama.args import LlamaConfig
    from tessera.models.llama.model import Llama

    torch.manual_seed(0)
    cfg = LlamaConfig.tiny()
    model = Llama(cfg).eval()
    seq_len = 48
    examples = random_examples(2, 9, cfg.vocab_size, 20)
    rows = pack(examples, seq_len, pad_id=0)
    assert len(rows) >= 2 and rows.num_docs == len(examples)
    batch = rows.batch(list(range(len(rows))))
    with torch.no_grad():
        logits = model(batch.input_ids, doc_ids=batch.doc_ids)
        packed_loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
        weighted, count, d = 0.0, 0, 0
        for r in range(len(rows)):
            for doc in range(int(batch.doc_ids[r].max()) + 1):
                sel = batch.doc_ids[r] == doc
                if d == len(examples) or not bool(sel.any()):
                    break
                inputs, targets = expected_positions(examples[d], seq_len)
                if len(inputs) != int(sel.sum()):
                    break  # the padding document of this row
                alone = model(torch.tensor([inputs]))[0]
                torch.testing.assert_close(logits[r][sel], alone, atol=1e-5, rtol=0)
                t = torch.tensor(targets)
                n = int((t != IGNORE_INDEX).sum())
                weighted += float(F.cross_entropy(alone, t, ignore_index=IGNORE_INDEX)) * n
                count += n
                d += 1
    assert d == len(examples)
    assert count == batch.num_label_tokens
    assert float(packed_loss) == pytest.approx(weighted / count, abs=1e-5)
