"""Memory pattern test: write known patterns into a buffer of 64-bit words, read them back, count the words that
differ (the idea of memtest86's fixed-pattern and own-address tests, on memory torch allocates).

Patterns (one 64-bit word each):
    ones       0xFFFFFFFFFFFFFFFF     every bit set
    x55        0x5555555555555555     alternating bits ...0101
    xaa        0xAAAAAAAAAAAAAAAA     alternating bits ...1010 (every bit flipped from x55)
    address    the word's byte offset in the buffer (index * 8): a word written to the wrong place is caught
    naddress   the bitwise complement of `address`
The buffer is an int64 tensor on any device; expected values are built chunk by chunk, so the test needs only a
chunk (not a second buffer) of extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.errors import InvalidArgumentError

WORD_BYTES = 8
PATTERNS = ("ones", "x55", "xaa", "address", "naddress")
_CONSTANT = {"ones": -1, "x55": 0x5555555555555555, "xaa": 0xAAAAAAAAAAAAAAAA - (1 << 64)}  # as signed int64
_CHUNK_WORDS = 1 << 22  # 32 MiB of expected values at a time


@dataclass(frozen=True)
class PatternCheck:
    """What reading back one pattern found: `mismatches` words differ; the first one is at byte offset
    `first_bad_offset` (None if none), where `expected` was written and `found` was read (as unsigned 64-bit)."""

    pattern: str
    words: int
    mismatches: int
    first_bad_offset: int | None = None
    expected: int | None = None
    found: int | None = None


def _expected(pattern: str, start: int, count: int, device: torch.device) -> torch.Tensor | int:
    if pattern in _CONSTANT:
        return _CONSTANT[pattern]
    offsets = torch.arange(start, start + count, dtype=torch.int64, device=device) * WORD_BYTES
    return offsets if pattern == "address" else torch.bitwise_not(offsets)


def _check_args(buf: torch.Tensor, pattern: str) -> None:
    if pattern not in PATTERNS:
        raise InvalidArgumentError(f"memory test: unknown pattern {pattern!r}; expected one of {PATTERNS}")
    if buf.dtype != torch.int64 or buf.dim() != 1 or not buf.is_contiguous():
        raise InvalidArgumentError(f"memory test: the buffer must be a contiguous 1-D int64 tensor, got "
                                   f"{buf.dtype} of shape {tuple(buf.shape)}")


def fill_pattern(buf: torch.Tensor, pattern: str) -> None:
    """Writes `pattern` (see the module docstring) into every word of `buf` (1-D int64)."""
    _check_args(buf, pattern)
    for start in range(0, buf.numel(), _CHUNK_WORDS):
        chunk = buf[start:start + _CHUNK_WORDS]
        value = _expected(pattern, start, chunk.numel(), buf.device)
        if isinstance(value, int):
            chunk.fill_(value)
        else:
            chunk.copy_(value)


def check_pattern(buf: torch.Tensor, pattern: str) -> PatternCheck:
    """Reads `buf` back and counts the words that are not `pattern`; reports the first bad word's byte offset."""
    _check_args(buf, pattern)
    mismatches, first = 0, None
    for start in range(0, buf.numel(), _CHUNK_WORDS):
        chunk = buf[start:start + _CHUNK_WORDS]
        expected = _expected(pattern, start, chunk.numel(), buf.device)
        bad = chunk != expected
        n_bad = int(bad.sum().item())
        if n_bad and first is None:
            first = start + int(torch.nonzero(bad)[0, 0].item())
        mismatches += n_bad
    if first is None:
        return PatternCheck(pattern, buf.numel(), 0)
    want = _expected(pattern, first, 1, buf.device)
    want = want if isinstance(want, int) else int(want[0].item())
    return PatternCheck(pattern, buf.numel(), mismatches, first * WORD_BYTES, want & (2**64 - 1),
                        int(buf[first].item()) & (2**64 - 1))


def run_patterns(buf: torch.Tensor, patterns: tuple[str, ...] = PATTERNS, sync=lambda: None) -> list[PatternCheck]:
    """Fills and checks each pattern in turn; `sync` waits for the device (torch.cuda.synchronize on GPU)."""
    results = []
    for pattern in patterns:
        fill_pattern(buf, pattern)
        sync()
        results.append(check_pattern(buf, pattern))
    return results
