"""Reading and streaming-writing Hugging Face safetensors checkpoints (one file, or several with
model.safetensors.index.json).

The writer knows every tensor's name, shape and dtype before any data exists, writes the headers first and then
each tensor's bytes at its offset as it arrives, so a caller can hand tensors over one unit at a time (peak host
memory: one unit). Format: 8-byte little-endian header length, JSON header, data; see the safetensors
specification (github.com/huggingface/safetensors, "Format").
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.errors import InvalidArgumentError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


class WeightIndex:
    """Which file holds each tensor of an HF model directory, and each tensor's shape, read from the headers only
    (nothing is loaded). InvalidArgumentError when the directory has no safetensors weights."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.dir = model_dir
        if (model_dir / INDEX).is_file():
            try:
                weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise InvalidArgumentError(f"{model_dir / INDEX}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (model_dir / SINGLE).is_file():
            files = [SINGLE]
        else:
            present = sorted(p.name for p in model_dir.iterdir())
            raise InvalidArgumentError(
                f"{model_dir}: no {SINGLE} or {INDEX} (tessera reads safetensors weights; found: {present})")
        self.file_of: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self._handles = {}
        for name in files:
            path = model_dir / name
            if not path.is_file():
                raise InvalidArgumentError(f"{model_dir / INDEX} names {name}, which is missing")
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise InvalidArgumentError(f"{path}: not a readable safetensors file ({e})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.file_of[key] = name
                self.shape[key] = tuple(handle.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key` as stored (CPU, the file's dtype); read from the memory-mapped file."""
        return self._handles[self.file_of[key]].get_tensor(key)


@dataclass
class _Entry:
    file: str
    offset: int  # absolute byte offset in the file
    nbytes: int
    shape: tuple[int, ...]
    written: bool = False


class StreamingWriter:
    """Writes tensors `specs` ({name: shape}, in order) of dtype `dtype` into `out_dir`, split into files of at
    most `max_file_bytes` (a tensor larger than that gets a file of its own). Files are written under temporary
    names and moved into place by commit(), which also writes the index when there are several files."""

    def __init__(self, out_dir: Path, specs: dict[str, tuple[int, ...]], dtype: torch.dtype, max_file_bytes: int):
        if dtype not in _DTYPE_NAMES:
            raise InvalidArgumentError(f"cannot write dtype {dtype} to safetensors here; expected one of "
                                       f"{list(_DTYPE_NAMES)}")
        self.out_dir, self.dtype = out_dir, dtype
        esize = torch.empty((), dtype=dtype).element_size()
        groups: list[list[str]] = [[]]
        size = 0
        for name, shape in specs.items():
            n = esize * _numel(shape)
            if groups[-1] and size + n > max_file_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += n
        count = len(groups)
        self.files = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                  for i in range(count)]
        self.entries: dict[str, _Entry] = {}
        self._fds: dict[str, int] = {}
        self.total_bytes = 0
        for fname, names in zip(self.files, groups):
            header, offset = {"__metadata__": {"format": "pt", "producer": "tessera"}}, 0
            for name in names:
                n = esize * _numel(specs[name])
                header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(specs[name]),
                                "data_offsets": [offset, offset + n]}
                offset += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
            base = 8 + len(raw)
            for name in names:
                begin, end = header[name]["data_offsets"]
                self.entries[name] = _Entry(fname, base + begin, end - begin, tuple(specs[name]))
            fd = os.open(self._tmp(fname), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[fname] = fd
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, base + offset)
            self.total_bytes += offset

    def _tmp(self, fname: str) -> str:
        return str(self.out_dir / f".{fname}.tmp-{os.getpid()}")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Writes `tensor` (any float dtype, converted; its full shape) as `name`."""
        e = self.entries[name]
        if tuple(tensor.shape) != e.shape:
            raise InvalidArgumentError(f"tensor '{name}' has shape {tuple(tensor.shape)}; expected {e.shape}")
        data = tensor.detach().to("cpu", self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        view, done = memoryview(data), 0
        while done < e.nbytes:
            done += os.pwrite(self._fds[e.file], view[done:], e.offset + done)
        e.written = True

    def commit(self) -> list[str]:
        """fsyncs and moves every file into place (and the index, for several files). InvalidArgumentError naming
        the tensors never written. Returns the file names."""
        missing = [n for n, e in self.entries.items() if not e.written]
        if missing:
            self.abort()
            raise InvalidArgumentError(f"{len(missing)} tensors were never written: {missing[:5]}")
        for fname, fd in self._fds.items():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        for fname in self.files:
            os.replace(self._tmp(fname), self.out_dir / fname)
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {n: e.file for n, e in self.entries.items()}}
            tmp = self.out_dir / f".{INDEX}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(index, indent=2))
            os.replace(tmp, self.out_dir / INDEX)
        return list(self.files)

    def abort(self) -> None:
        for fname, fd in self._fds.items():
            os.close(fd)
            try:
                os.unlink(self._tmp(fname))
            except FileNotFoundError:
                pass
        self._fds.clear()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
