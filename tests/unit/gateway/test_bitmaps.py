"""Packed bitmap helpers shared by the state stores, against their bit-by-bit definition."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.state.base import packed_with_bits, segment_counts


@pytest.mark.parametrize("segment_bits", [4, 8, 24, 64, 4096])
def test_segment_counts_count_the_set_bits_of_each_segment(segment_bits: int) -> None:
    rng = np.random.default_rng(segment_bits)
    total_bits = 8 * segment_bits * 3  # a multiple of both 8 and the segment
    positions = rng.choice(total_bits, size=total_bits // 3, replace=False)
    bits = packed_with_bits(None, positions, total_bits)
    expected = np.zeros(total_bits // segment_bits, np.int64)
    for position in positions:  # the definition: bit p lies in segment p // segment_bits
        expected[position // segment_bits] += 1
    counts = segment_counts(bits, segment_bits)
    assert counts.dtype == np.int64 and counts.tolist() == expected.tolist()
    # As stores load it: read-only over a blob, here one that starts off an 8-byte boundary.
    unaligned = np.frombuffer(b"\0" + bits.tobytes(), np.uint8, offset=1)
    assert segment_counts(unaligned, segment_bits).tolist() == expected.tolist()
