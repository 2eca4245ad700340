"""TokenFile: a corpus tokenized once into a flat memory-mapped array of token ids, read by offset.

[Note: token file layout]
Two files: <path> holds every document's tokens back to back (uint16 when vocab_size <= 65536, else uint32,
native little-endian), <path>.index.json the index: format version, dtype, num_tokens, num_docs, the byte size and
sha256 of <path>, doc offsets (num_docs + 1 token offsets, offsets[i]..offsets[i+1] is document i) and a free-form
"meta" dict (build_text keeps its input fingerprint there).
Never half-written: both are written to temporary names beside the targets; then the old index is removed, the data
renamed into place, the index renamed last. A write that fails leaves nothing under the real names (an iterator
that raises, a full disk); a crash between the renames leaves data without an index, which open() rejects.
Open checks sizes only (cheap); verify() also hashes the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from tessera.errors import CheckpointError, InvalidArgumentError

FORMAT = "tessera-token-file"
VERSION = 1


def index_path(path) -> Path:
    """The index file that belongs to data file `path`."""
    return Path(str(path) + ".index.json")


class TokenFileError(CheckpointError):
    """A token file is missing, truncated, corrupt, or does not match its index."""


class TokenFile:
    """A read-only memory-mapped token file (see [Note: token file layout]).

    Attributes: path (Path), dtype (np.uint16 / np.uint32), num_tokens (int), num_docs (int), offsets (np.ndarray
    int64 [num_docs + 1], token offsets of document starts, offsets[-1] == num_tokens), meta (dict)."""

    @staticmethod
    def write(path, docs: Iterable[Sequence[int]], *, vocab_size: int, meta: dict | None = None) -> "TokenFile":
        """Writes `docs` (each a sequence of token ids in [0, vocab_size)) to `path` and its index, atomically, and
        returns the opened TokenFile. `meta` (JSON-serialisable) is stored in the index.
        Raises InvalidArgumentError naming the document for a token outside [0, vocab_size); whatever `docs`
        raises propagates, and in every failure no file is left under `path` or its index name."""
        if vocab_size <= 0:
            raise InvalidArgumentError(f"TokenFile.write: vocab_size={vocab_size}, expected > 0")
        path = Path(path)
        dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_data = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        tmp_index = None
        try:
            offsets = [0]
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                for i, doc in enumerate(docs):
                    arr = np.asarray(doc, dtype=np.int64).reshape(-1)
                    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
                        raise InvalidArgumentError(f"TokenFile.write {path}: document {i} has token id {bad}, "
                                                   f"expected ids in [0, {vocab_size})")
                    raw = arr.astype(dtype).tobytes()
                    h.update(raw)
                    f.write(raw)
                    offsets.append(offsets[-1] + arr.size)
                f.flush()
                os.fsync(f.fileno())
            index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "num_tokens": offsets[-1],
                     "num_docs": len(offsets) - 1, "data_bytes": offsets[-1] * dtype.itemsize,
                     "data_sha256": h.hexdigest(), "meta": meta or {}, "offsets": offsets}
            fd, tmp_index = tempfile.mkstemp(prefix=f".{path.name}.index.tmp-", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(index, f)
                f.flush()
                os.fsync(f.fileno())
            index_path(path).unlink(missing_ok=True)
            os.replace(tmp_data, path)
            os.replace(tmp_index, index_path(path))
        except BaseException:
            for tmp in (tmp_data, tmp_index):
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
            raise
        return TokenFile(path)

    def __init__(self, path) -> None:
        """Opens `path` and its index read-only. Raises TokenFileError (a tessera.CheckpointError) naming the file
        when either is missing, the index is unreadable or of another format, or the data's size differs from
        what the index says (truncated or overwritten)."""
        self.path = Path(path)
        ipath = index_path(self.path)
        if not self.path.is_file():
            raise TokenFileError(f"token file {self.path} does not exist")
        if not ipath.is_file():
            raise TokenFileError(f"token file {self.path}: its index {ipath} is missing (an interrupted write?)")
        try:
            index = json.loads(ipath.read_text())
            fmt, version = index["format"], index["version"]
            self.dtype = np.dtype(index["dtype"])
            self.num_tokens, self.num_docs = int(index["num_tokens"]), int(index["num_docs"])
            data_bytes, self.data_sha256 = int(index["data_bytes"]), index["data_sha256"]
            self.offsets = np.asarray(index["offsets"], dtype=np.int64)
            self.meta = index["meta"]
        except (ValueError, KeyError, TypeError) as e:
            raise TokenFileError(f"token file index {ipath} is unreadable ({type(e).__name__}: {e})") from None
        if fmt != FORMAT or version != VERSION:
            raise TokenFileError(f"{ipath}: format {fmt!r} version {version}, expected {FORMAT!r} version {VERSION}")
        if self.dtype not in (np.uint16, np.uint32) or data_bytes != self.num_tokens * self.dtype.itemsize:
            raise TokenFileError(f"{ipath}: dtype {self.dtype} with {self.num_tokens} tokens does not make "
                                 f"{data_bytes} bytes")
        if (self.offsets.shape != (self.num_docs + 1,) or self.offsets[0] != 0
                or self.offsets[-1] != self.num_tokens or np.any(np.diff(self.offsets) < 0)):
            raise TokenFileError(f"{ipath}: doc offsets are not {self.num_docs + 1} non-decreasing values from 0 "
                                 f"to {self.num_tokens}")
        size = self.path.stat().st_size
        if size != data_bytes:
            raise TokenFileError(f"token file {self.path} has {size} bytes; its index {ipath} says {data_bytes} "
                                 f"({self.num_tokens} {self.dtype} tokens): truncated or overwritten")
        # np.memmap cannot map an empty file.
        self._data = (np.memmap(self.path, dtype=self.dtype, mode="r") if self.num_tokens
                      else np.zeros(0, dtype=self.dtype))

    def verify(self) -> None:
        """Hashes the data file against the sha256 in the index; raises TokenFileError when they differ."""
        from tessera.models.fetch.cache import sha256_file

        digest = sha256_file(self.path)
        if digest != self.data_sha256:
            raise TokenFileError(f"token file {self.path}: sha256 {digest}, its index says {self.data_sha256} "
                                 "(corrupted)")

    def doc(self, i: int) -> np.ndarray:
        """Document i's tokens, int64 [length]. Raises InvalidArgumentError when i is not in [0, num_docs)."""
        if not 0 <= i < self.num_docs:
            raise InvalidArgumentError(f"token file {self.path}: document {i} out of range [0, {self.num_docs})")
        return self.read(int(self.offsets[i]), int(self.offsets[i + 1] - self.offsets[i]))

    def read(self, offset: int, n: int) -> np.ndarray:
        """Tokens [offset, offset + n) of the whole stream as int64 [n] (a copy). Raises InvalidArgumentError when
        the range is not inside [0, num_tokens)."""
        if offset < 0 or n < 0 or offset + n > self.num_tokens:
            raise InvalidArgumentError(f"token file {self.path}: read of tokens [{offset}, {offset + n}) outside "
                                       f"[0, {self.num_tokens})")
        return np.array(self._data[offset:offset + n], dtype=np.int64)  # a copy whatever the file's dtype

    def __len__(self) -> int:
        return self.num_docs

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, {self.num_docs} docs, {self.num_tokens} {self.dtype} tokens)"
