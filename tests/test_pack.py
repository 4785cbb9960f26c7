"""Bit packing against the reference bit stream and a hand-written GPTQ example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkern
import reference as R


@pytest.mark.parametrize("order", ["lsb", "msb"])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1001])
def test_pack_matches_reference_stream(bits, order, n, rng):
    codes = rng.integers(0, 2**bits, n).astype(np.uint8)
    ref = R.pack_bits(codes, bits, order)
    assert len(ref) == (n * bits + 7) // 8
    got = qkern.pack_bits(torch.from_numpy(codes), bits, order=order)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and got.dim() == 1
    np.testing.assert_array_equal(got.numpy(), ref)
    got_np = qkern.pack_bits(codes, bits, order=order)
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_array_equal(got_np, ref)
    back = qkern.unpack_bits(got, bits, n, order=order)
    assert back.dtype == torch.uint8 and back.shape == (n,)
    np.testing.assert_array_equal(back.numpy(), codes)
    np.testing.assert_array_equal(R.unpack_bits(ref, bits, n, order), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_signed_codes_pack_twos_complement(bits, rng):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = rng.integers(lo, hi, 333).astype(np.int8)
    for order in ("lsb", "msb"):
        got = qkern.pack_bits(torch.from_numpy(codes), bits, order=order)
        np.testing.assert_array_equal(got.numpy(), R.pack_bits(codes, bits, order))
        back = qkern.unpack_bits(got, bits, len(codes), order=order).numpy()
        np.testing.assert_array_equal(back, codes.astype(np.uint8) & ((1 << bits) - 1))


def test_pack_ignores_high_bits():
    codes = np.array([0xF3, 0x1C, 0xFF], np.uint8)
    got = qkern.pack_bits(codes, 2, order="lsb")
    np.testing.assert_array_equal(got, [0x33])  # low 2 bits: 3, 0, 3


def test_pack_known_bytes():
    # lsb: first element in the low nibble; msb (bitsandbytes): first element in the high nibble
    c = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert qkern.pack_bits(c, 4, order="lsb").tolist() == [0x21, 0x03]
    assert qkern.pack_bits(c, 4, order="msb").tolist() == [0x12, 0x30]
    # 3-bit msb stream: 101 110 111 -> 10111011 1xxxxxxx
    c3 = torch.tensor([5, 6, 7], dtype=torch.uint8)
    assert qkern.pack_bits(c3, 3, order="msb").tolist() == [0b10111011, 0b10000000]
    assert qkern.pack_bits(c3, 3, order="lsb").tolist() == [0b11110101, 0b00000001]
    assert qkern.pack_bits(torch.tensor([1, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0b1101]


def test_pack_default_order_is_lsb():
    c = torch.tensor([1, 2], dtype=torch.uint8)
    assert qkern.pack_bits(c, 4).tolist() == [0x21]
    assert qkern.unpack_bits(torch.tensor([0x21], dtype=torch.uint8), 4, 2).tolist() == [1, 2]


def test_pack_2d_flattens_row_major(rng):
    codes = rng.integers(0, 16, (7, 10)).astype(np.uint8)
    got = qkern.pack_bits(torch.from_numpy(codes), 4, order="msb")
    np.testing.assert_array_equal(got.numpy(), R.pack_bits(codes.ravel(), 4, "msb"))
    nc = torch.from_numpy(codes).t()
    got = qkern.pack_bits(nc, 4)
    np.testing.assert_array_equal(got.numpy(), R.pack_bits(codes.T.ravel(), 4, "lsb"))


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_short_buffer_raises(bits):
    n = 17
    need = (n * bits + 7) // 8
    short = torch.zeros(need - 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"(?i)short|small|bytes|length|need"):
        qkern.unpack_bits(short, bits, n)
    assert qkern.unpack_bits(torch.zeros(need, dtype=torch.uint8), bits, n).shape == (n,)


def test_gptq_4bit_hand_example():
    # GPTQ: qweight[i // 8, col] |= w[i, col] << (4 * (i % 8)), written out by hand
    w = np.array([[0, 15], [1, 14], [2, 13], [3, 12], [4, 11], [5, 10], [6, 9], [7, 8],
                  [8, 0], [9, 0], [10, 0], [11, 0], [12, 0], [13, 0], [14, 0], [15, 1]],
                 dtype=np.uint8)
    want = np.array([[0x76543210, 0x89ABCDEF], [0xFEDCBA98, 0x10000000]],
                    dtype=np.uint32).view(np.int32)
    got = qkern.pack_int32(torch.from_numpy(w), 4, 0)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), want)
    back = qkern.unpack_int32(got, 4, 16, 0)
    np.testing.assert_array_equal(np.asarray(back).astype(np.int64), w.astype(np.int64))
    # the same along dim 1 (compressed-tensors: packed along the input dim of (out, in))
    got1 = qkern.pack_int32(torch.from_numpy(w.T.copy()), 4, 1)
    np.testing.assert_array_equal(got1.numpy(), want.T)


@pytest.mark.parametrize("bits,n", [(4, 8), (8, 4), (1, 32), (3, 10)])
def test_pack_int32_one_word_per_line(bits, n, rng):
    """A single int32 word per line (e.g. GPTQ 4-bit with 8 input features)."""
    codes = rng.integers(0, 2**bits, (n, 5)).astype(np.uint8)
    got = qkern.pack_int32(torch.from_numpy(codes), bits, 0)
    np.testing.assert_array_equal(got.numpy(), R.pack_int32(codes, bits, 0))
    fresh = torch.tensor(R.pack_int32(codes, bits, 0).tolist(), dtype=torch.int32)
    for words in (got, fresh):  # `fresh`: plain strides, like words loaded from a checkpoint
        back = qkern.unpack_int32(words, bits, n, 0)
        np.testing.assert_array_equal(np.asarray(back).astype(np.int64), codes.astype(np.int64))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_pack_int32_vs_reference(bits, dim, rng):
    codes = rng.integers(0, 2**bits, (37, 22)).astype(np.uint8)
    ref = R.pack_int32(codes, bits, dim)
    got = qkern.pack_int32(torch.from_numpy(codes), bits, dim)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_array_equal(got.numpy(), ref)
    got_np = qkern.pack_int32(codes, bits, dim)
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_array_equal(got_np, ref)
    n = codes.shape[dim]
    back = qkern.unpack_int32(got, bits, n, dim)
    np.testing.assert_array_equal(np.asarray(back).astype(np.int64), codes.astype(np.int64))


@pytest.mark.parametrize("shape,dim", [((0,), 0), ((1, 0), 0), ((0, 8), 1), ((3, 0), 1)])
def test_pack_int32_empty(shape, dim):
    codes = torch.zeros(shape, dtype=torch.uint8)
    ref = R.pack_int32(codes.numpy(), 4, dim)
    got = qkern.pack_int32(codes, 4, dim)
    assert tuple(got.shape) == ref.shape
    back = qkern.unpack_int32(got, 4, shape[dim], dim)
    assert tuple(np.asarray(back).shape) == shape


def test_pack_empty():
    assert qkern.pack_bits(torch.empty(0, dtype=torch.uint8), 4).numel() == 0
    assert qkern.unpack_bits(torch.empty(0, dtype=torch.uint8), 4, 0).numel() == 0
