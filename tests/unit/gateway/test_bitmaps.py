"""Bitmap helpers of the state stores (packed, and the SQLite store's sparse sets), against their
bit-by-bit definition."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.state.base import packed_with_bits, segment_counts
from gateway.state.bitsets import add_bits, bit_counts, from_blob, is_sparse


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


def test_add_bits_keeps_few_bits_as_positions_then_packs_them_as_the_definition_says() -> None:
    total_bits, segment_bits = 8 * 512, 256  # packed: 512 bytes, so sparse below 128 set bits
    rng = np.random.default_rng(7)
    bits, truth, forms = None, set(), []
    for _ in range(60):
        positions = rng.integers(0, total_bits, int(rng.integers(0, 6)))
        before = bits
        bits, new = add_bits(bits, positions, total_bits)
        assert new.tolist() == sorted(set(positions.tolist()) - truth)
        assert (bits is before) == (before is not None and not new.size)  # unchanged: the same array back
        truth |= set(positions.tolist())
        expected = np.zeros(total_bits // segment_bits, np.int64)
        for p in truth:
            expected[p // segment_bits] += 1
        assert bit_counts(bits, total_bits, segment_bits).tolist() == expected.tolist()
        forms.append(is_sparse(bits))
        if is_sparse(bits):
            assert bits.tolist() == sorted(truth) and 4 * len(truth) < total_bits // 8
        else:
            assert bits.nbytes == total_bits // 8 and 4 * len(truth) >= total_bits // 8
    assert forms[0] and not forms[-1] and forms == sorted(forms, reverse=True)  # sparse, then packed for good


def test_add_bits_stores_a_blob_that_reads_back_as_the_same_set() -> None:
    sparse, _ = add_bits(None, np.array([5, 1, 5, 3]), 4096)
    assert is_sparse(sparse) and sparse.tolist() == [1, 3, 5]
    assert from_blob(sparse.tobytes(), True).tolist() == [1, 3, 5]
    packed, _ = add_bits(None, np.arange(0, 4096, 2), 4096)
    assert not is_sparse(packed)
    assert (from_blob(packed.tobytes(), False) == packed_with_bits(None, np.arange(0, 4096, 2), 4096)).all()


@pytest.mark.parametrize("bad", [-1, 4096])
def test_add_bits_rejects_positions_out_of_range(bad: int) -> None:
    current, _ = add_bits(None, np.array([1]), 4096)
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        add_bits(current, np.array([2, bad]), 4096)


def test_add_bits_refuses_a_packed_bitmap_of_another_size() -> None:
    with pytest.raises(ValueError, match="has 2048 bits, not 4096"):
        add_bits(np.zeros(256, np.uint8), np.array([1]), 4096)
