"""The memory pattern checker against hand-written patterns and planted corruptions."""

from __future__ import annotations

import torch

from tessera.doctor import checks, memtest
from tessera.doctor.memtest import PATTERNS, check_pattern, fill_pattern

U64 = 2**64 - 1


def test_patterns_by_hand():
    buf = torch.empty(4, dtype=torch.int64)
    want = {"ones": [U64] * 4, "x55": [0x5555555555555555] * 4, "xaa": [0xAAAAAAAAAAAAAAAA] * 4,
            "address": [0, 8, 16, 24], "naddress": [U64 - 0, U64 - 8, U64 - 16, U64 - 24]}
    for pattern in PATTERNS:
        fill_pattern(buf, pattern)
        assert [v & U64 for v in buf.tolist()] == want[pattern], pattern
        assert check_pattern(buf, pattern).mismatches == 0


def test_planted_corruption_is_counted_across_chunks(monkeypatch):
    monkeypatch.setattr(memtest, "_CHUNK_WORDS", 1000)  # several chunks, so offsets past the first are exercised
    buf = torch.empty(5000, dtype=torch.int64)
    fill_pattern(buf, "address")
    buf[1234] ^= 1 << 17  # one flipped bit
    buf[4999] = 0  # a stuck word
    buf[2500] = 8 * 2501  # the neighbour's value: a word written to the wrong address
    found = check_pattern(buf, "address")
    assert (found.mismatches, found.first_bad_offset) == (3, 1234 * 8)
    assert (found.expected, found.found) == (1234 * 8, 1234 * 8 ^ (1 << 17))
    fill_pattern(buf, "xaa")
    buf[7] = 0x2AAAAAAAAAAAAAAA  # the top bit dropped
    found = check_pattern(buf, "xaa")
    assert (found.mismatches, found.first_bad_offset, found.found) == (1, 56, 0x2AAAAAAAAAAAAAAA)


def test_memory_check_fails_the_rank_on_a_mismatch(monkeypatch):
    fill = memtest.fill_pattern

    def corrupting_fill(buf, pattern):  # a word that does not hold what was written (x55 only)
        fill(buf, pattern)
        if pattern == "x55":
            buf[100] = 0

    assert checks.memory(torch.device("cpu"), quick=True).status == "pass"
    monkeypatch.setattr(memtest, "fill_pattern", corrupting_fill)
    res = checks.memory(torch.device("cpu"), quick=True)
    assert res.status == "fail"
    assert "1 mismatching 64-bit words" in res.error and "pattern x55 at byte offset 800" in res.error
    assert "expected 0x5555555555555555, found 0x0000000000000000" in res.error
