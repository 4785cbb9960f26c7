"""qkern.decompose: quantized SVD and the Tucker-2 / CP conv decompositions.

References: numpy's SVD (truncation, Eckart-Young), tensors built from known factors
(exact low rank), torch's F.conv2d with the reconstructed kernel, numpy symmetric per-channel
int8 rounding written from the definition, storage counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qkern
from qkern.decompose import (
    cp_als,
    cp_conv,
    cp_reconstruct,
    decompose_convs,
    decompose_model,
    factor_bits,
    quantize_factors,
    quantized_svd,
    rank_for_budget,
    storage_bits,
    tucker2,
    tucker2_reconstruct,
    tucker_conv,
)
from qkern.models import digits as D
from qkern.nn import weight_bits


def _rel(a, b) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _np_truncated(w: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _np_int8_channel(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per row: scale amax / 127, round half to even, codes in [-127, 127]."""
    s = np.abs(w).max(axis=1, keepdims=True) / 127.0
    return np.clip(np.round(w / s), -127, 127) * s


def test_float_factors_are_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g)
    m = quantized_svd(w, rank=6, fmt=None)
    ref = _np_truncated(w.numpy(), 6)
    np.testing.assert_allclose(m.dequantize_weight().numpy(), ref, atol=1e-4)
    s = np.linalg.svd(w.numpy().astype(np.float64), compute_uv=False)
    err = float(torch.linalg.norm(m.dequantize_weight().double() - w.double()))
    assert err == pytest.approx(float(np.sqrt((s[6:] ** 2).sum())), rel=1e-5)  # Eckart-Young
    x = torch.randn(5, 80, generator=g)
    np.testing.assert_allclose(m(x).detach().numpy(), x.numpy() @ ref.T, atol=1e-3)


def test_int8_factors_are_the_rounded_svd_factors():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 8, generator=g) @ torch.randn(8, 64, generator=g)  # rank 8
    m = quantized_svd(w, rank=8, fmt="int8", group_size=None)
    u, s, vh = np.linalg.svd(w.numpy().astype(np.float64), full_matrices=False)
    left, right = u[:, :8] * np.sqrt(s[:8]), np.sqrt(s[:8])[:, None] * vh[:8]
    # the factors are defined up to a sign per rank-1 term: compare L R and each |factor|
    lq, rq = m.up.dequantize_weight().numpy(), m.down.dequantize_weight().numpy()
    sign = np.sign((lq * left).sum(0))
    np.testing.assert_allclose(lq, _np_int8_channel((left * sign).astype(np.float32)),
                               atol=1e-5)
    np.testing.assert_allclose(rq, _np_int8_channel((right * sign[:, None]).astype(
        np.float32)), atol=1e-5)
    assert _rel(m.dequantize_weight(), w) < 0.02


def test_storage_counted_by_hand_and_budget_rank():
    # R: 4 x 64 int4 codes + 4 x 2 float16 scales; L: 64 x 4 codes, one scale per row
    assert factor_bits(64, 64, 4, "int4", 32) == 4 * 64 * 4 + 8 * 16 + 64 * 4 * 4 + 64 * 16
    # asymmetric: a 4-bit zero point per group too
    assert factor_bits(64, 64, 4, "int4", 32, symmetric=False) == \
        4 * 64 * 4 + 8 * 20 + 64 * 4 * 4 + 64 * 20
    assert factor_bits(10, 20, 3, None) == 16 * 3 * 30
    w = torch.randn(96, 128)
    for fmt, g in (("int4", 32), ("int8", None), ("int3", 64), (None, None)):
        for budget in (0.5, 1.0, 2.5):
            r = rank_for_budget(96, 128, budget, fmt, g)
            fits = [k for k in range(1, 97) if factor_bits(96, 128, k, fmt, g) <= budget * 96
                    * 128]
            assert r == max(fits)
        m = quantized_svd(w, budget_bits=1.0, fmt=fmt, group_size=g)
        assert weight_bits(m) == factor_bits(96, 128, m.rank, fmt, g) <= 96 * 128


def test_bad_input():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="exactly one"):
        quantized_svd(w, rank=2, budget_bits=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        quantized_svd(w)
    with pytest.raises(ValueError, match="below rank 1"):
        quantized_svd(w, budget_bits=0.01)
    with pytest.raises(ValueError, match="2-D"):
        quantized_svd(torch.randn(8))
    with pytest.raises(ValueError, match="rank"):
        quantized_svd(w, rank=9)
    with pytest.raises(ValueError, match="ranks"):
        tucker2(torch.randn(4, 3, 3, 3), (5, 2))
    with pytest.raises(ValueError, match="4-D"):
        cp_als(torch.randn(4, 3, 3), 2)
    with pytest.raises(ValueError, match="grouped"):
        tucker_conv(torch.nn.Conv2d(4, 4, 3, groups=2), (2, 2))
    with pytest.raises(ValueError, match="method"):
        decompose_convs(torch.nn.Conv2d(4, 4, 3), "svd", 2)


def test_decompose_model_full_rank_is_the_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10))
    d = decompose_model(m, rank=64, fmt=None)
    x = torch.randn(7, 32)
    ref = F.linear(F.relu(F.linear(x, m[0].weight, m[0].bias)), m[2].weight, m[2].bias)
    torch.testing.assert_close(d(x), ref, atol=1e-4, rtol=1e-4)
    assert type(m[0]) is torch.nn.Linear  # the original is untouched
    assert qkern.decompose.LowRankLinear is type(d[0])


def _known_tucker(shape, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks[0], ranks[1], *shape[2:], generator=g, dtype=torch.float64)
    uo = torch.randn(shape[0], ranks[0], generator=g, dtype=torch.float64)
    ui = torch.randn(shape[1], ranks[1], generator=g, dtype=torch.float64)
    return torch.einsum("abhw,oa,ib->oihw", core, uo, ui)


@pytest.mark.parametrize("als", [0, 3])
def test_tucker2_recovers_a_known_low_rank_kernel(als):
    k = _known_tucker((12, 10, 3, 3), (4, 3))
    core, uo, ui = tucker2(k, (4, 3), als_iters=als)
    assert core.shape == (4, 3, 3, 3) and uo.shape == (12, 4) and ui.shape == (10, 3)
    assert _rel(tucker2_reconstruct(core, uo, ui).double(), k) < 1e-5


def test_hooi_does_not_worsen_hosvd():
    k = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(3))
    errs = [_rel(tucker2_reconstruct(*tucker2(k, (5, 4), als_iters=a)), k) for a in (0, 5)]
    assert errs[1] <= errs[0] + 1e-6
    # HOSVD's bound: error^2 <= the discarded energy of both unfoldings
    s0 = np.linalg.svd(k.reshape(16, -1).numpy(), compute_uv=False)
    s1 = np.linalg.svd(k.transpose(0, 1).reshape(12, -1).numpy(), compute_uv=False)
    bound = np.sqrt((s0[5:] ** 2).sum() + (s1[4:] ** 2).sum()) / float(torch.linalg.norm(k))
    assert errs[0] <= bound + 1e-6


def test_cp_als_recovers_a_known_low_rank_kernel():
    g = torch.Generator().manual_seed(2)
    fac = [torch.randn(d, 3, generator=g, dtype=torch.float64) for d in (8, 6, 3, 3)]
    k = torch.einsum("or,ir,yr,xr->oiyx", *fac)
    got = cp_als(k, 3, iters=500)
    assert _rel(cp_reconstruct(got).double(), k) < 1e-4


CONV_CASES = [dict(stride=1, padding=1, dilation=1), dict(stride=2, padding=0, dilation=1),
              dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1))]


@pytest.mark.parametrize("kw", CONV_CASES)
def test_tucker_sequence_is_the_conv_with_the_reconstructed_kernel(kw):
    torch.manual_seed(0)
    c = torch.nn.Conv2d(10, 14, (3, 3), **kw)
    seq = tucker_conv(c, (6, 5), als_iters=2)
    core, uo, ui = tucker2(c.weight, (6, 5), als_iters=2)
    x = torch.randn(2, 10, 11, 9)
    ref = F.conv2d(x, tucker2_reconstruct(core, uo, ui), c.bias, **kw)
    torch.testing.assert_close(seq(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", CONV_CASES)
def test_cp_sequence_is_the_conv_with_the_reconstructed_kernel(kw):
    torch.manual_seed(0)
    c = torch.nn.Conv2d(10, 14, (3, 3), **kw)
    seq = cp_conv(c, 7, iters=30)
    x = torch.randn(2, 10, 11, 9)
    ref = F.conv2d(x, cp_reconstruct(cp_als(c.weight, 7, iters=30)), c.bias, **kw)
    torch.testing.assert_close(seq(x), ref, atol=1e-4, rtol=1e-4)


def test_quantized_factors_and_their_size():
    torch.manual_seed(0)
    c = torch.nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    seq = cp_conv(c, 8, iters=20)
    q = quantize_factors(seq, "int8")
    # the depthwise convs hold numpy's int8 rounding of their float weights
    for i in (1, 2):
        w = seq[i].weight.detach().reshape(8, -1).numpy()
        np.testing.assert_allclose(q[i].weight.detach().reshape(8, -1).numpy(),
                                   _np_int8_channel(w), atol=1e-6)
    assert type(q[0]).__name__ == "QuantConv2d" and type(q[3]).__name__ == "QuantConv2d"
    assert _rel(q(x), seq(x)) < 0.02
    # 1x1 16->8, two depthwise 8x3, 1x1 8->32; int8 codes + a 16-bit scale per out channel
    want = (8 * 16 * 8 + 8 * 16) + 2 * (8 * 3 * 8 + 8 * 16) + (32 * 8 * 8 + 32 * 16)
    assert storage_bits(q) == want
    assert storage_bits(seq) == 32 * (8 * 16 + 2 * 8 * 3 + 32 * 8)
    t = quantize_factors(tucker_conv(c, (8, 6)), "int4", group_size=None)
    assert storage_bits(t) == (6 * 16 * 4 + 6 * 16) + (8 * 54 * 4 + 8 * 16) + \
        (32 * 8 * 4 + 32 * 16)


def test_digits_cnn_full_rank_tucker_is_exact():
    torch.manual_seed(0)
    m = D.make_model("cnn").eval()
    x = torch.randn(4, 1, 8, 8)
    d = decompose_convs(m, "tucker", (64, 64), layers=["0", "2"])
    with torch.no_grad():
        torch.testing.assert_close(d(x), m(x), atol=1e-4, rtol=1e-4)
    lo = decompose_convs(m, "cp", 4, fmt="int8", layers=["2"], als_iters=10)
    assert storage_bits(lo) < storage_bits(m)
