"""Every batch producer (PackedRows, TokenFileRows, the recipes' synthetic rows) returns three tensors that share
storage with nothing: writing into one of them leaves the others and the producer's rows as they were (see
[Note: batches are read-only] in tessera/data/batch.py). The reference is the same batch taken before the write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.data import IGNORE_INDEX, Example, TokenFile, TokenFileRows, pack
from tessera.recipes.data_sources import SyntheticRows

FIELDS = ("input_ids", "labels", "doc_ids")


def _packed(tmp_path):
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(12):
        ids = rng.integers(3, 500, size=int(rng.integers(3, 12))).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:]))
    return pack(examples, 16, pad_id=0)


def _token_rows(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 500, size=int(rng.integers(5, 30))).tolist() for _ in range(10)]
    return TokenFileRows(TokenFile.write(tmp_path / "c.tok", docs, vocab_size=500), 8)


def _synthetic(tmp_path):
    return SyntheticRows(16, 16, 500, seed=0)


@pytest.mark.parametrize("make", [_packed, _token_rows, _synthetic], ids=["packed", "token_file", "synthetic"])
@pytest.mark.parametrize("indices", [[2], [0, 3, 1]], ids=["one_row", "three_rows"])
def test_batch_tensors_share_storage_with_nothing(tmp_path, make, indices):
    rows = make(tmp_path)
    for written in FIELDS:
        batch = rows.batch(indices)
        before = {k: getattr(batch, k).clone() for k in FIELDS}
        getattr(batch, written).fill_(IGNORE_INDEX)  # what the evaluation loop once did to labels
        for k in FIELDS:
            if k != written:  # e.g. labels.fill_(-100) must not reach input_ids (1-row synthetic batches did)
                assert torch.equal(getattr(batch, k), before[k]), (written, k)
        again = rows.batch(indices)  # nor the rows the batch came from
        for k in FIELDS:
            assert torch.equal(getattr(again, k), before[k]), (written, k)
