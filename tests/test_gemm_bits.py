"""qkern::gemm_binary / gemm_ternary against independent references: a float64 matmul of the
+-1 / 0 matrices times alpha, and an int64 +-1 dot product for the XNOR mode. The packed layout
is checked against its documented bit positions (docs/numerics.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.library import opcheck

import isas
import qkern
from qkern.ops import bits

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in opcheck

OPS = torch.ops.qkern
# M: the 8/4/2/1-row batches and several table panels (K = 4096); N: partial 8-row tiles;
# K: partial 30-weight blocks and groups of 3
# N: partial 8-row tiles, odd tile counts (AVX-512 takes tiles in pairs) and whole pairs (48)
MS, NS, KS = (1, 3, 17, 256), (1, 7, 33, 48), (1, 2, 29, 30, 31, 64, 1000, 4096)
ISAS = list(isas.HAVE)  # every path this CPU has (tests/isas.py)
CONFIGS = list(itertools.product(ISAS, (1, 2)))
SHAPES = list(itertools.product(MS, NS, KS))


def _data(m, n, k, seed, ternary=False, zero_row=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if zero_row and m > 1:
        x[1] = 0.0
    if ternary:
        codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    else:
        codes = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    alpha = torch.rand(n, generator=g) + 0.25
    bias = torch.randn(n, generator=g)
    return x, codes, alpha, bias


def _signs(codes, ternary):
    return codes.double() if ternary else 1.0 - 2.0 * codes.double()


def _ref_float(x, codes, alpha, bias, ternary):
    y = (x.double() @ _signs(codes, ternary).T) * alpha.double()
    return y if bias is None else y + bias.double()


def _tol(x, alpha, bias):
    t = 2e-5 * x.double().abs().sum(-1, keepdim=True) * alpha.double() + 1e-6
    return t if bias is None else t + 1e-6 * bias.double().abs()


def _ref_xnor(x, codes, alpha, bias):
    """int64 dot products of the +-1 matrices; y in float32 as the kernel's epilogue."""
    k = x.shape[-1]
    sx = 1 - 2 * (x < 0).to(torch.int64)
    sw = 1 - 2 * codes.to(torch.int64)
    dot = (sx[:, None, :] * sw[None, :, :]).sum(-1)  # (M, N) exact
    beta = (x.double().abs().sum(-1) / k).float()
    y = dot.float() * (alpha[None, :] * beta[:, None])
    return dot, (y if bias is None else y + bias)


def _run_all(fn):
    """fn() under every ISA and thread count -> list of results."""
    out = []
    for isa, threads in CONFIGS:
        qkern.set_isa(isa)
        qkern.set_num_threads(threads)
        out.append(fn())
    return out


def _same_bits_per_isa(ys):
    """Per ISA the same bits on 1 and 2 threads; AVX-512 the AVX2 bits (its float path is the
    AVX2 kernel; the scalar kernel adds in k order: within the bound only)."""
    for i in range(0, len(ys), 2):
        assert torch.equal(ys[i].view(torch.int32), ys[i + 1].view(torch.int32))
    if "avx2" in ISAS and "avx512" in ISAS:
        a, b = 2 * ISAS.index("avx2"), 2 * ISAS.index("avx512")
        assert torch.equal(ys[a].view(torch.int32), ys[b].view(torch.int32))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_binary_float(m, n, k):
    x, codes, alpha, bias = _data(m, n, k, seed=m * 10007 + n * 101 + k)
    wb = bits.pack_binary(codes)
    b = bias if n % 2 else None
    ref = _ref_float(x, codes, alpha, b, False)
    ys = _run_all(lambda: OPS.gemm_binary(x, wb, alpha, b, n, k, False))
    _same_bits_per_isa(ys)
    for y in ys:
        assert y.shape == (m, n) and y.dtype == torch.float32
        err = (y.double() - ref).abs()
        assert (err <= _tol(x, alpha, b)).all(), err.max()
        if m > 1:  # zero activation row -> bias (or 0)
            want = torch.zeros(n) if b is None else b
            assert torch.equal(y[1].abs() if b is None else y[1], want)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_ternary_float(m, n, k):
    x, codes, alpha, bias = _data(m, n, k, seed=m * 7919 + n * 31 + k, ternary=True)
    wp = bits.pack_ternary(codes)
    b = bias if k % 2 else None
    ref = _ref_float(x, codes, alpha, b, True)
    ys = _run_all(lambda: OPS.gemm_ternary(x, wp, alpha, b, n, k))
    _same_bits_per_isa(ys)
    for y in ys:
        err = (y.double() - ref).abs()
        assert (err <= _tol(x, alpha, b)).all(), err.max()


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_xnor(m, n, k):
    x, codes, alpha, bias = _data(m, n, k, seed=m * 131 + n * 17 + k)
    x[0, : k // 3] = -0.0  # -0.0 binarizes to +1
    wb = bits.pack_binary(codes)
    b = bias if (m + n) % 2 else None
    _, ref = _ref_xnor(x, codes, alpha, b)
    ys = _run_all(lambda: OPS.gemm_binary(x, wb, alpha, b, n, k, True))
    for y in ys:  # every ISA and thread count: bit-identical
        assert torch.equal(y.view(torch.int32), ys[0].view(torch.int32))
    torch.testing.assert_close(ys[0], ref, rtol=1e-6, atol=1e-6)
    if m > 1:  # beta = 0 for a zero row
        assert torch.equal(ys[0][1].abs(), torch.zeros(n) if b is None else b.abs())


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 7, 63), (17, 33, 65), (5, 9, 1000),
                                   (4, 5, 4096), (2, 3, 191)])
def test_xnor_exact_dot(m, n, k):
    """x in {+1, -1} (beta = 1), alpha = 1: y is the integer dot product itself."""
    g = torch.Generator().manual_seed(k)
    x = 1.0 - 2.0 * torch.randint(0, 2, (m, k), generator=g).float()
    codes = torch.randint(0, 2, (n, k), generator=g, dtype=torch.uint8)
    dot, _ = _ref_xnor(x, codes, torch.ones(n), None)
    for y in _run_all(lambda: OPS.gemm_binary(x, bits.pack_binary(codes), torch.ones(n), None,
                                              n, k, True)):
        assert torch.equal(y, dot.float())


def _word_offset(n: int, k: int, h: int, plane: int, ternary: bool) -> int:
    """Byte offset of row n's 32-bit word of block h (docs/numerics.md)."""
    planes, kb = (2 if ternary else 1), -(-k // 30)
    return (((n // 8) * kb + h) * planes + plane) * 32 + 4 * (n % 8)


def _dirty(packed: torch.Tensor, n: int, k: int, ternary: bool) -> torch.Tensor:
    """Every ignored bit set: bits 30, 31 of every word, k >= K, and the padding rows."""
    d = packed.clone().view(-1)
    kb, planes = -(-k // 30), (2 if ternary else 1)
    for row in range(-(-n // 8) * 8):
        for h in range(kb):
            for plane in range(planes):
                o = _word_offset(row, k, h, plane, ternary)
                word = int.from_bytes(bytes(d[o:o + 4].tolist()), "little")
                valid = (1 << min(30, k - 30 * h)) - 1 if row < n else 0
                word |= 0xFFFFFFFF & ~valid
                d[o:o + 4] = torch.tensor(list(word.to_bytes(4, "little")), dtype=torch.uint8)
    return d.view(packed.shape)


@pytest.mark.parametrize("m", [5, 20])  # 20: the amx level's tiles (16 rows up)
@pytest.mark.parametrize("k", [1, 29, 31, 65, 1000])
def test_padding_bits_ignored(k, m):
    n = 6
    x, codes, alpha, _ = _data(m, n, k, seed=k, zero_row=False)
    t = codes.to(torch.int8) * -1
    wb, wt = bits.pack_binary(codes), bits.pack_ternary(t)
    dirty_b, dirty_t = _dirty(wb, n, k, False), _dirty(wt, n, k, True)
    assert not torch.equal(dirty_b, wb) and not torch.equal(dirty_t, wt)
    for isa, threads in CONFIGS:
        qkern.set_isa(isa)
        qkern.set_num_threads(threads)
        for xnor in (False, True):
            assert torch.equal(OPS.gemm_binary(x, wb, alpha, None, n, k, xnor),
                               OPS.gemm_binary(x, dirty_b, alpha, None, n, k, xnor))
        assert torch.equal(OPS.gemm_ternary(x, wt, alpha, None, n, k),
                           OPS.gemm_ternary(x, dirty_t, alpha, None, n, k))


def test_pack_layout():
    codes = torch.zeros(10, 70, dtype=torch.uint8)
    ones = [(0, 0), (0, 9), (1, 30), (1, 69), (9, 31), (9, 60)]
    for n, k in ones:
        codes[n, k] = 1
    wb = bits.pack_binary(codes)
    assert wb.shape == (2, 3 * 32) and wb.dtype == torch.uint8
    assert bits.packed_nbytes(10, 70, False) == wb.numel() == 16 * 3 * 4
    want = torch.zeros(wb.numel(), dtype=torch.uint8)
    for n, k in ones:
        o = _word_offset(n, 70, k // 30, 0, False) + (k % 30) // 8
        want[o] |= 1 << (k % 30 % 8)
    assert torch.equal(wb.view(-1), want)
    t = torch.tensor([[1, -1, 0, -1] + [0] * 27 + [1]], dtype=torch.int8)
    wt = bits.pack_ternary(t)
    assert wt.shape == (1, 2 * 64) and bits.packed_nbytes(1, 32, True) == wt.numel()
    assert wt[0, 0].item() == 0b0001 and wt[0, 32].item() == 0b1010  # P, Q planes of block 0
    assert wt[0, 64].item() == 0b10 and wt[0, 96].item() == 0  # k = 31: block 1, bit 1
    assert int(wt.sum()) == 0b0001 + 0b1010 + 0b10
    with pytest.raises(ValueError, match="pack_binary"):
        bits.pack_binary(torch.full((1, 3), 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pack_ternary"):
        bits.pack_ternary(torch.full((1, 3), 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D"):
        bits.pack_binary(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="K >= 1"):
        bits.pack_ternary(torch.zeros(2, 0, dtype=torch.int8))
    assert bits.pack_binary(torch.zeros(0, 5, dtype=torch.uint8)).numel() == 0


@pytest.mark.parametrize("m", [3, 20])  # 20: the amx level (those rows go to AVX2 there)
@pytest.mark.parametrize("ternary", [False, True])
def test_nonfinite_and_large(ternary, m):
    """A NaN / Inf activation reaches exactly the outputs whose weight at that k is nonzero;
    large magnitudes stay within the float32 bound."""
    n, k = 19, 100
    x, codes, alpha, _ = _data(m, n, k, seed=77, ternary=ternary, zero_row=False)
    x = x * 1e30
    ref = _ref_float(x, codes, alpha, None, ternary)
    x[1, 40], x[2, 41] = float("nan"), float("inf")
    nz = codes[:, 40] != 0 if ternary else torch.ones(n, dtype=torch.bool)
    sign41 = codes[:, 41].double() if ternary else 1.0 - 2.0 * codes[:, 41].double()
    for y in _run_all(lambda: (OPS.gemm_ternary(x, bits.pack_ternary(codes), alpha, None, n, k)
                               if ternary else
                               OPS.gemm_binary(x, bits.pack_binary(codes), alpha, None, n, k,
                                               False))):
        fin = [0] + list(range(3, m))
        err = (y[fin].double() - ref[fin]).abs()
        assert (err <= _tol(x[fin], alpha, None)).all()
        assert torch.equal(y[1].isnan(), nz)
        want = torch.where(sign41 > 0, float("inf"), float("-inf"))
        want = torch.where(sign41 == 0, y[2], want)
        assert torch.equal(y[2][sign41 != 0], want[sign41 != 0].float())
        assert y[2][sign41 == 0].isfinite().all()


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("k", [100, 1000])
def test_one_hot_rows_exact(ternary, k):
    """One activation per row, at every k: each path returns float32(+-x * alpha) bit for bit
    (the amx level: all 24 bits of x from its bfloat16 pieces, and every weight bit found in
    its 30-bit word)."""
    n = 21
    g = torch.Generator().manual_seed(k)
    _, codes, alpha, _ = _data(1, n, k, seed=k + 1, ternary=ternary)
    mant = torch.randint(2**23, 2**24, (k,), generator=g).double()
    vals = (mant * 2.0 ** torch.randint(-40, 10, (k,), generator=g).double()).float()
    x = torch.diag(vals)[torch.randperm(k, generator=g)]
    want = ((x @ _signs(codes, ternary).float().T) * alpha).float()  # one nonzero term: exact
    packed = bits.pack_ternary(codes) if ternary else bits.pack_binary(codes)
    for y in _run_all(lambda: OPS.gemm_ternary(x, packed, alpha, None, n, k) if ternary
                      else OPS.gemm_binary(x, packed, alpha, None, n, k, False)):
        assert torch.equal(y.view(torch.int32), want.view(torch.int32))


def test_batched_and_empty():
    x, codes, alpha, bias = _data(6, 7, 100, seed=3)
    wb = bits.pack_binary(codes)
    y = OPS.gemm_binary(x.view(2, 3, 100), wb, alpha, bias, 7, 100, False)
    assert y.shape == (2, 3, 7)
    assert torch.equal(y.view(6, 7), OPS.gemm_binary(x, wb, alpha, bias, 7, 100, False))
    for xnor in (False, True):
        assert OPS.gemm_binary(x[:0], wb, alpha, bias, 7, 100, xnor).shape == (0, 7)
    assert OPS.gemm_ternary(x[:0], bits.pack_ternary(codes.to(torch.int8)), alpha, None,
                            7, 100).shape == (0, 7)


def test_errors():
    x, codes, alpha, _ = _data(2, 3, 70, seed=1)
    wb = bits.pack_binary(codes)
    with pytest.raises((RuntimeError, ValueError)):
        OPS.gemm_binary(x, wb[:, :-32], alpha, None, 3, 70, False)
    with pytest.raises((RuntimeError, ValueError)):
        OPS.gemm_binary(x[:, :69], wb, alpha, None, 3, 70, False)
    with pytest.raises((RuntimeError, ValueError)):
        OPS.gemm_binary(x, wb, alpha[:2], None, 3, 70, True)
    with pytest.raises((RuntimeError, ValueError)):
        OPS.gemm_ternary(x, wb, alpha, None, 3, 70)  # binary-sized buffer
    with pytest.raises((RuntimeError, ValueError)):
        OPS.gemm_binary(x, torch.zeros(3, 16, dtype=torch.uint8), alpha, None, 3, 70, False)
    with pytest.raises(ValueError, match="packed weight"):
        qkern._C.gemm_binary(x.numpy(), wb.view(-1)[:-1].numpy(), alpha.numpy(), None, 3, 70,
                             False)
    with pytest.raises(ValueError, match="null pointer"):
        qkern._C.gemm_bits_raw(False, 0, 1, 0, 0, 0, 8, 30, False, 0)
    with pytest.raises(ValueError, match="alpha"):
        OPS.gemm_ternary(x, bits.pack_ternary(codes.to(torch.int8)), alpha[:1], None, 3, 70)
    with pytest.raises((RuntimeError, ValueError)):
        OPS.gemm_binary(x.double(), wb, alpha, None, 3, 70, False)


@pytest.mark.parametrize("xnor", [False, True])
def test_opcheck(xnor):
    x, codes, alpha, bias = _data(3, 5, 77, seed=9)
    args = (x, bits.pack_binary(codes), alpha, bias, 5, 77, xnor)
    opcheck(OPS.gemm_binary.default, args)
    opcheck(OPS.gemm_binary.default, (x, args[1], alpha, None, 5, 77, xnor))
    t = codes.to(torch.int8) - (codes == 0).to(torch.int8) * torch.randint(0, 2, codes.shape,
                                                                           dtype=torch.int8)
    opcheck(OPS.gemm_ternary.default, (x, bits.pack_ternary(t), alpha, bias, 5, 77))


def test_compile_traces():
    x, codes, alpha, bias = _data(4, 5, 130, seed=11)
    wb = bits.pack_binary(codes)

    @torch.compile(backend="eager", fullgraph=True)
    def f(a):
        return OPS.gemm_binary(a, wb, alpha, bias, 5, 130, True) + 1.0

    assert torch.equal(f(x), OPS.gemm_binary(x, wb, alpha, bias, 5, 130, True) + 1.0)


def test_matches_dequantized_binary_format():
    """The packed path agrees with qkern's own binary quantization of a weight."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(9, 200, generator=g), torch.randn(4, 200, generator=g)
    q = qkern.quantize(w, "binary", granularity="channel")
    alpha = q.scale.float().reshape(-1)
    y = OPS.gemm_binary(x, bits.pack_binary(q.codes), alpha, None, 9, 200, False)
    ref = x.double() @ qkern.dequantize(q).double().T
    assert np.allclose(y.double().numpy(), ref.numpy(), rtol=1e-5, atol=1e-4)
