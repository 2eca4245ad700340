"""TokenFile: round trip against the documents written, reads by offset, and the failures that must be caught:
a truncated data file, a missing index, corrupted bytes, and a write that fails midway."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tessera.data import TokenFile, TokenFileError
from tessera.errors import InvalidArgumentError


def random_docs(seed: int, vocab: int, n: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(0, 60))).tolist() for _ in range(n)]


@pytest.mark.parametrize("vocab, dtype", [(50_000, np.uint16), (65_536, np.uint16), (128_256, np.uint32)])
def test_round_trip_and_read_by_offset(tmp_path, vocab, dtype):
    docs = random_docs(0, vocab)
    docs[3] = [vocab - 1, 0]  # the extremes of the range survive the narrow dtype
    tf = TokenFile.write(tmp_path / "c.tok", docs, vocab_size=vocab, meta={"note": "x"})
    stream = [t for d in docs for t in d]
    assert tf.dtype == dtype and tf.num_docs == len(docs) and tf.num_tokens == len(stream)
    assert os.path.getsize(tmp_path / "c.tok") == len(stream) * np.dtype(dtype).itemsize
    reopened = TokenFile(tmp_path / "c.tok")
    assert reopened.meta == {"note": "x"}
    for i, d in enumerate(docs):
        got = reopened.doc(i)
        assert got.dtype == np.int64 and got.tolist() == d
    for offset, n in [(0, 1), (17, 100), (len(stream) - 5, 5), (len(stream), 0)]:
        assert reopened.read(offset, n).tolist() == stream[offset:offset + n]
    reopened.verify()
    with pytest.raises(InvalidArgumentError, match=r"outside \[0, "):
        reopened.read(len(stream) - 1, 2)


def test_truncated_data_file_is_named(tmp_path):
    path = tmp_path / "c.tok"
    TokenFile.write(path, random_docs(1, 1000), vocab_size=1000)
    size = os.path.getsize(path)
    os.truncate(path, size - 2)
    with pytest.raises(TokenFileError, match=rf"{path} has {size - 2} bytes; .* says {size} .*truncated"):
        TokenFile(path)


def test_missing_index_and_corruption(tmp_path):
    path = tmp_path / "c.tok"
    TokenFile.write(path, random_docs(2, 1000), vocab_size=1000)
    with open(path, "r+b") as f:  # flip one byte: sizes still agree, only the hash can tell
        f.seek(5)
        b = f.read(1)
        f.seek(5)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(TokenFileError, match=r"sha256 .* \(corrupted\)"):
        TokenFile(path).verify()
    os.unlink(str(path) + ".index.json")
    with pytest.raises(TokenFileError, match=r"index .* is missing"):
        TokenFile(path)
    with pytest.raises(TokenFileError, match=r"does not exist"):
        TokenFile(tmp_path / "nothing.tok")


def test_interrupted_write_leaves_no_file(tmp_path):
    def docs():
        yield [1, 2, 3]
        yield [4, 5]
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        TokenFile.write(tmp_path / "c.tok", docs(), vocab_size=10)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_old_file(tmp_path):
    path = tmp_path / "c.tok"
    TokenFile.write(path, [[1, 2], [3]], vocab_size=10)
    with pytest.raises(InvalidArgumentError, match=r"document 1 has token id 10, expected ids in \[0, 10\)"):
        TokenFile.write(path, [[1], [10]], vocab_size=10)
    assert sorted(os.listdir(tmp_path)) == ["c.tok", "c.tok.index.json"]
    assert TokenFile(path).read(0, 3).tolist() == [1, 2, 3]
