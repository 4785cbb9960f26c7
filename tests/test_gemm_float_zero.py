"""Float zero points on the tiled int kernels (gemm_w4 / gemm_w23, HQQ's uint codes): the
weight is (float(u) - z) * s with u the stored unsigned code, against a float64 reference of
that product; scalar == AVX2 == AVX-512 bit for bit on 1 and 2 threads, GEMV and GEMM paths;
the fast mode within the int8 activation bound; the autograd decoder, the dequant fallback and
the checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import isas
import qkern
import qkern.ops.w4 as W4
import qkern.ops.w23 as W23
from qkern import formats as QF
from qkern.layout import Layout
from qkern.nn import QuantLinear
from qkern.nn.linear import KernelFallbackWarning
from qkern.tensor import QTensor

ISAS = isas.HAVE  # every ISA this CPU has (scalar first): the same bits on each


def weight(n, k, g, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
    s = (torch.rand(n, k // g, generator=gen) + 0.05) * 0.05
    z = (torch.rand(n, k // g, generator=gen) * 2**bits - 1.3).float()  # any float, < 0 too
    return u, s, z


def ref_weight(u, s, z, g) -> torch.Tensor:
    n, k = u.shape
    return ((u.double().view(n, -1, g) - z.double()[..., None]) * s.double()[..., None]
            ).view(n, k)


def packed(bits, u, s, z, g):
    if bits == 4:
        return W4.pack_weight((u.to(torch.int16) - 8).to(torch.int8), s, z, g), W4.gemm_w4
    return W23.pack_weight(u, s, z, g, bits, signed=False), W23.gemm_w23


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("m", [1, 5])
def test_exact_mode_matches_reference_on_every_path(bits, m):
    n, k, g = 19, 128, 32
    u, s, z = weight(n, k, g, bits, seed=bits)
    w, gemm = packed(bits, u, s, z, g)
    x = torch.randn(m, k)
    ref = x.double() @ ref_weight(u, s, z, g).T
    outs = []
    for isa in ISAS:
        for threads in (1, 2):
            qkern.set_isa(isa)
            qkern.set_num_threads(threads)
            outs.append(gemm(x, w, None, "exact"))
    qkern.set_isa("auto")
    for y in outs:
        assert torch.equal(y, outs[0])
    bound = 1e-5 * (x.abs().double() @ ref_weight(u, s, z, g).abs().T + 1)
    assert bool(((outs[0].double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_fast_mode_same_on_every_path_and_close(bits):
    n, k, g = 16, 64, 32
    u, s, z = weight(n, k, g, bits, seed=7)
    w, gemm = packed(bits, u, s, z, g)
    x = torch.randn(3, k)
    outs = []
    for isa in ISAS:
        qkern.set_isa(isa)
        outs.append(gemm(x, w, None, "fast"))
    qkern.set_isa("auto")
    assert all(torch.equal(y, outs[0]) for y in outs)
    ref = x.double() @ ref_weight(u, s, z, g).T
    # int8 activations per block of 32: |x - xq dx| <= dx / 2 = amax / 254 per element
    amax = x.abs().view(3, -1, 32).amax(-1).repeat_interleave(32, -1).double()
    bound = (amax / 254) @ ref_weight(u, s, z, g).abs().T * 1.01 + 1e-5
    assert bool(((outs[0].double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("bits", [4, 3])
def test_quantlinear_weight_and_gradient(bits):
    n, k, g = 10, 64, 32
    u, s, z = weight(n, k, g, bits, seed=3)
    q = QTensor(u, s, z, QF.get(f"uint{bits}"), Layout("group", (n, k), 1, g))
    ql = QuantLinear(q, None)
    assert ql.kernel.endswith("_exact") and ql.kernel_reason is None
    w = q.dequantize()
    assert torch.equal(ql.dequantize_weight(), w)  # the kernel decodes exactly dequantize()
    np.testing.assert_allclose(w.double().numpy(), ref_weight(u, s, z, g).numpy(), rtol=1e-6,
                               atol=1e-7)
    x = torch.randn(4, k, requires_grad=True)
    ql(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, n) @ w, rtol=1e-5, atol=1e-6)


def test_dequant_fallback_and_signed_formats():
    n, k, g = 6, 48, 16
    u, s, z = weight(n, k, g, 8, seed=1)
    q = QTensor(u, s, z, QF.get("uint8"), Layout("group", (n, k), 1, g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelFallbackWarning)
        ql = QuantLinear(q, None)
        assert ql.kernel == "dequant"
        assert torch.equal(ql.dequantize_weight(), q.dequantize())
        # int4 codes with float zero points: the kernels take float zeros of unsigned codes
        c = (torch.randint(-8, 8, (n, 64))).to(torch.int8)
        qi = QTensor(c, torch.full((n, 2), 0.1), torch.full((n, 2), 0.25),
                     QF.get("int4"), Layout("group", (n, 64), 1, 32))
        qli = QuantLinear(qi, None)
    assert qli.kernel == "dequant" and "unsigned" in qli.kernel_reason
    assert torch.equal(qli.dequantize_weight(), (c.float() - 0.25) * 0.1)


def test_pack_checks_float_zeros():
    u, s, z = weight(8, 64, 32, 4)
    c = (u.to(torch.int16) - 8).to(torch.int8)
    with pytest.raises(ValueError, match="finite"):
        W4.pack_weight(c, s, torch.full_like(z, float("nan")), 32)
    with pytest.raises(ValueError, match="float32"):
        W4.pack_weight(c, s, z.double(), 32)
    with pytest.raises(ValueError, match="zeros must be"):
        W23.pack_weight(u & 3, s, z[:, :1], 32, 2, signed=False)
