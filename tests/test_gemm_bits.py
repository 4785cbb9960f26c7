"""qkern::gemm_binary / gemm_ternary against independent references: a float64 matmul of the
+-1 / 0 matrices times alpha, and an int64 +-1 dot product for the XNOR mode."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.library import opcheck

import qkern
from qkern.ops import bits

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in opcheck

OPS = torch.ops.qkern
MS, NS, KS = (1, 3, 17, 256), (1, 7, 33), (1, 63, 64, 65, 1000, 4096)
ISAS = ["scalar", "avx2"] if qkern._C.cpu_has_avx2() else ["scalar"]
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


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_binary_float(m, n, k):
    x, codes, alpha, bias = _data(m, n, k, seed=m * 10007 + n * 101 + k)
    wb = bits.pack_binary(codes)
    b = bias if n % 2 else None
    ref = _ref_float(x, codes, alpha, b, False)
    for y in _run_all(lambda: OPS.gemm_binary(x, wb, alpha, b, n, k, False)):
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
    for y in _run_all(lambda: OPS.gemm_ternary(x, wp, alpha, b, n, k)):
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


@pytest.mark.parametrize("k", [1, 63, 65, 1000])
def test_padding_bits_ignored(k):
    x, codes, alpha, _ = _data(5, 6, k, seed=k, zero_row=False)
    wb, wt = bits.pack_binary(codes), bits.pack_ternary(codes.to(torch.int8) * -1)
    dirty_b, dirty_t = wb.clone(), wt.clone()
    kw = bits.words(k)
    for i in range(kw * 64):
        if i >= k:  # set every padding bit (ternary: in both masks)
            dirty_b[:, i // 8] |= 1 << (i % 8)
            w, j = divmod(i, 64)
            dirty_t[:, 16 * w + j // 8] |= 1 << (j % 8)
            dirty_t[:, 16 * w + 8 + j // 8] |= 1 << (j % 8)
    for isa in ISAS:
        qkern.set_isa(isa)
        for xnor in (False, True):
            assert torch.equal(OPS.gemm_binary(x, wb, alpha, None, 6, k, xnor),
                               OPS.gemm_binary(x, dirty_b, alpha, None, 6, k, xnor))
        assert torch.equal(OPS.gemm_ternary(x, wt, alpha, None, 6, k),
                           OPS.gemm_ternary(x, dirty_t, alpha, None, 6, k))


def test_pack_layout():
    codes = torch.zeros(2, 70, dtype=torch.uint8)
    codes[0, 0] = codes[0, 9] = codes[1, 64] = codes[1, 69] = 1
    wb = bits.pack_binary(codes)
    assert wb.shape == (2, 16) and wb.dtype == torch.uint8
    assert wb[0].tolist() == [1, 2] + [0] * 14
    assert wb[1].tolist() == [0] * 8 + [33] + [0] * 7
    t = torch.tensor([[1, -1, 0, -1]], dtype=torch.int8)
    wt = bits.pack_ternary(t)
    assert wt.shape == (1, 16)
    assert wt[0, 0].item() == 0b1011 and wt[0, 8].item() == 0b1010
    with pytest.raises(ValueError):
        bits.pack_binary(torch.full((1, 3), 2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        bits.pack_ternary(torch.full((1, 3), 2, dtype=torch.int8))


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
        OPS.gemm_binary(x, wb[:2], alpha, None, 3, 70, False)
    with pytest.raises((RuntimeError, ValueError)):
        OPS.gemm_binary(x[:, :69], wb, alpha, None, 3, 70, False)
    with pytest.raises((RuntimeError, ValueError)):
        OPS.gemm_binary(x, wb, alpha[:2], None, 3, 70, True)
    with pytest.raises((RuntimeError, ValueError)):
        OPS.gemm_ternary(x, wb, alpha, None, 3, 70)  # binary-sized buffer
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
