"""qkern::gemm_w4 (int4 group-wise weight matmul) against independent float64 references
written from docs/numerics.md "int4 group-wise matmul": the packed layout byte for byte, the
exact mode within its float32 accumulation bound, the fast mode against a reference that
quantizes x per block exactly as specified (to float32 accumulation rounding) and against the
true product within the activation-quantization bound; every ISA (tests/isas.py: scalar, AVX2,
AVX-512, AMX), 1 and 2 threads, GEMV and GEMM paths all bit-identical to the scalar path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import isas
import qkern
import qkern.ops.w4 as W
from ref_groupwise import U, check_exact, check_fast, dequant64, quantize_x_ref, ref_exact  # noqa: F401

SIMD = isas.params(("avx2", "avx512", "amx"))  # the paths compared bit for bit with scalar

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in opcheck


def make_weight(n, k, group, asym, seed=0, scale=0.05):
    """asym: False (symmetric), True / "int" (int zero points), "float" (float zero points of
    u = q + 8, HQQ style)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, k // group, generator=g) + 0.05) * scale
    z = None
    if asym == "float":
        z = (torch.rand(n, k // group, generator=g) * 17 - 1.3).float()
    elif asym:
        z = torch.randint(-8, 8, (n, k // group), dtype=torch.int32, generator=g)
    return q, s, z


def ref_zeros(z):
    """Zero points as the references take them (of q = u - 8): float ones are of u."""
    return z.double() - 8 if z is not None and z.is_floating_point() else z


def run(x, w, mode, bias=None, isa=None, threads=2):
    qkern.set_isa(isa or isas.HAVE[-1])
    assert qkern.get_isa() == (isa or isas.HAVE[-1])
    qkern.set_num_threads(threads)
    return W.gemm_w4(x, w, bias, mode)


def same_bits(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---- layout ---------------------------------------------------------------------------------

def packed_ref(q: torch.Tensor) -> np.ndarray:
    """The documented layout, from the codes: tile t, block b, vector i, row r, byte j."""
    n, k = q.shape
    npad = (n + 7) // 8 * 8
    u = np.full((npad, k), 8, np.int64)
    u[:n] = q.numpy().astype(np.int64) + 8
    out = np.zeros((npad // 8, k // 32, 4, 8, 4), np.uint8)
    for t in range(npad // 8):
        for b in range(k // 32):
            for i in range(4):
                for r in range(8):
                    for j in range(4):
                        c = u[8 * t + r, 32 * b + 8 * i + j], u[8 * t + r, 32 * b + 8 * i + 4 + j]
                        out[t, b, i, r, j] = c[0] | c[1] << 4
    return out.reshape(npad // 8, k // 32, 128)


@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (8, 32), (9, 96), (33, 128)])
def test_pack_layout_and_roundtrip(n, k):
    q, s, z = make_weight(n, k, 32, True, seed=n)
    w = W.pack_weight(q, s, z, 32)
    assert w["packed"].dtype == torch.uint8
    assert np.array_equal(w["packed"].numpy(), packed_ref(q))
    npad = (n + 7) // 8 * 8
    assert w["scales"].shape == (npad // 8, k // 32, 8)
    assert torch.equal(w["scales"][0, :, 0], s[0])
    c2, s2, z2 = W.unpack_weight(w)
    assert torch.equal(c2, q) and torch.equal(s2, s) and torch.equal(z2, z)
    assert torch.equal(torch.from_numpy(qkern._C.unpack_w4(w["packed"].numpy(), n, k)), q)


def test_pack_errors():
    q, s, z = make_weight(4, 96, 32, True)
    with pytest.raises(ValueError, match="multiple of group_size"):
        W.pack_weight(q, s[:, :1], None, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        W.pack_weight(q[:, :48], s, None, 48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        W.pack_weight(q[:, :40], s, None, 32)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        W.pack_weight(q.clone().fill_(8), s, None, 32)
    with pytest.raises(ValueError, match="zero points"):
        W.pack_weight(q, s, z + 9, 32)
    with pytest.raises(ValueError, match="scales must be"):
        W.pack_weight(q, s[:, :2], None, 32)
    with pytest.raises(ValueError, match="multiple of group_size"):
        qkern._C.pack_w4(q.numpy(), 64)
    w = W.pack_weight(q, s, z, 32)
    with pytest.raises(ValueError, match="K = 96"):
        W.gemm_w4(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="mode"):
        W.gemm_w4(torch.randn(2, 96), w, mode="slow")
    with pytest.raises(ValueError, match="scales"):
        torch.ops.qkern.gemm_w4(torch.randn(2, 96), w["packed"], s, None, None, 4, 96, 32, 0)
    q8, s8, _ = make_weight(8, 96, 32, False)  # N % 8 == 0: (N, K/G) has the right size
    w8 = W.pack_weight(q8, s8, None, 32)
    with pytest.raises(ValueError, match="tile layout"):
        torch.ops.qkern.gemm_w4(torch.randn(2, 96), w8["packed"], s8, None, None, 8, 96, 32, 1)


# ---- numerics -------------------------------------------------------------------------------

SHAPES = [  # M, N, K, G: N odd and not a multiple of 16 (tile pairs), M around the blocks
    (1, 7, 32, 32), (3, 33, 96, 32), (17, 7, 4096, 128), (1, 33, 4096, 64),
    (17, 33, 4096, 32), (512, 7, 96, 32), (35, 16, 256, 128), (2, 24, 32, 32),
    (5, 41, 128, 64), (13, 40, 256, 128), (7, 9, 64, 32), (64, 17, 128, 32),
    (67, 25, 96, 32), (2, 72, 128, 64), (1, 136, 256, 128), (4, 8, 64, 64), (9, 130, 64, 32),
    # amx: 8 rows after a whole tile padded to a tile, 12 alone padded, 11 alone on AVX-512
    (24, 33, 256, 64), (12, 17, 128, 32), (11, 16, 64, 32),
]


@pytest.mark.parametrize("isa", SIMD)
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("asym", [False, "int", "float"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_all_paths_identical(shape, asym, mode, isa):
    m, n, k, g = shape
    q, s, z = make_weight(n, k, g, asym, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    bias = torch.randn(n) if asym else None
    w = W.pack_weight(q, s, z, g)
    want = run(x, w, mode, bias, "scalar", 1)
    (check_exact if mode == "exact" else check_fast)(want, x, q, s, ref_zeros(z), g, bias)
    for t in (1, 2):
        assert same_bits(run(x, w, mode, bias, isa, t), want)
    rows = torch.cat([run(x[i : i + 1], w, mode, bias, isa) for i in range(m)])  # GEMV path
    assert same_bits(rows, want)


@pytest.mark.parametrize("isa", SIMD)  # scalar: compared on a sample of rows
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("m", [1, 512])
def test_large_gemv_gemm(m, mode, isa):
    n, k, g = 520, 4096, 128  # large enough for both modes to run on the pool
    q, s, z = make_weight(n, k, g, True, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    w = W.pack_weight(q, s, z, g)
    y = run(x, w, mode, isa=isa, threads=2)
    (check_exact if mode == "exact" else check_fast)(y, x, q, s, z, g)
    assert same_bits(y, run(x, w, mode, isa=isa, threads=1))
    pick = torch.arange(0, m, 73)  # rows are independent: scalar on a sample of them
    assert same_bits(y[pick], run(x[pick], w, mode, isa="scalar", threads=1))


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_zero_rows_and_magnitudes(mode, isa):
    m, n, k, g = 6, 12, 256, 64
    q, s, z = make_weight(n, k, g, True, seed=5)
    q[3] = 0
    z[3] = 0  # a weight row of zeros
    s[5] = 0.0  # a row with zero scales
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    x[1] = 0.0  # an activation row of zeros
    x[2] *= 1e17  # large (products ~1e33: no overflow)
    x[4] *= 1e-20  # tiny but normal
    x[5, :32] = 0.0  # one zero block
    x[0, 64:96] = 1e-41  # one block of subnormals (fast mode: d < FLT_MIN -> 0)
    s2 = s.clone()
    s2[:, 0] *= 1e15
    for scales in (s, s2):
        w = W.pack_weight(q, scales, z, g)
        y = run(x, w, mode, isa=isa)
        (check_exact if mode == "exact" else check_fast)(y, x, q, scales, z, g)
        assert bool((y[1] == 0).all()) and bool((y[:, 3] == 0).all()) and bool((y[:, 5] == 0).all())
        assert same_bits(y, run(x, w, mode, isa="scalar"))


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("pos", [5, 52])  # first / second half of a block
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_activations(bad, pos, isa):
    """exact mode: IEEE propagation to that row only; fast mode: NonFiniteError (int8
    activation codes cannot hold NaN/Inf), like W8A8."""
    q, s, z = make_weight(9, 64, 32, False)
    w = W.pack_weight(q, s, z, 32)
    x = torch.randn(3, 64)
    x[0, pos] = bad
    y = run(x, w, "exact", isa=isa)
    assert bool(torch.isfinite(y[1:]).all())
    assert not bool(torch.isfinite(y[0]).any())
    assert same_bits(y[1:], run(x[1:], w, "exact", isa="scalar"))
    with pytest.raises(qkern.ops.NonFiniteError, match="NaN or Inf"):
        run(x, w, "fast", isa=isa)
    x[0, pos] = 0.0
    assert bool(torch.isfinite(run(x, w, "fast", isa=isa)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_leading_dims(dtype):
    q, s, z = make_weight(10, 128, 64, True)
    w = W.pack_weight(q, s, z, 64)
    x = torch.randn(2, 3, 128).to(dtype)
    bias = torch.randn(10)
    for mode in ("exact", "fast"):
        y = W.gemm_w4(x, w, bias, mode)
        assert y.shape == (2, 3, 10) and y.dtype == torch.float32
        assert torch.equal(y, W.gemm_w4(x.float(), w, bias, mode))
    assert W.gemm_w4(x[0, 0], w).shape == (10,)
    assert W.gemm_w4(torch.empty(0, 128), w).shape == (0, 10)


@pytest.mark.parametrize("mode", [0, 1])
def test_opcheck(mode):
    q, s, z = make_weight(13, 96, 32, True)
    w = W.pack_weight(q, s, z, 32)
    x = torch.randn(5, 96)
    args = (x, w["packed"], w["scales"], w["zeros"], torch.randn(13), 13, 96, 32, mode)
    torch.library.opcheck(torch.ops.qkern.gemm_w4.default, args)
    x3 = torch.randn(2, 1, 96)
    torch.library.opcheck(torch.ops.qkern.gemm_w4.default,
                          (x3, w["packed"], w["scales"], None, None, 13, 96, 32, mode))
