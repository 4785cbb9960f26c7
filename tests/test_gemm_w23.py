"""qkern::gemm_w23 (2-bit / 3-bit group-wise weight matmul) against independent float64
references written from docs/numerics.md "2-bit and 3-bit group-wise matmul": the packed
layout bit for bit, the exact mode within its float32 accumulation bound, the fast mode against
a reference that quantizes x per block exactly as specified and against the true product within
the activation-quantization bound; every ISA path (tests/isas.py), 1 and 2 threads, GEMV and
GEMM paths all bit-identical; QuantLinear picks the kernel for int2/int3/uint2/uint3 group
weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import isas
import qkern
import qkern.ops.w23 as W
from qkern.nn import QuantLinear
from ref_groupwise import U, check_exact, check_fast, dequant64, quantize_x_ref, ref_exact  # noqa: F401

ISAS = list(isas.HAVE)  # every path this CPU has (scalar first); tests/isas.py
BEST = ISAS[-1]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in opcheck


def code_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def make_weight(n, k, group, asym, bits=2, signed=True, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    lo, hi = code_range(bits, signed)
    dt = torch.int8 if signed else torch.uint8
    q = torch.randint(lo, hi + 1, (n, k), generator=g).to(dt)
    s = (torch.rand(n, k // group, generator=g) + 0.05) * scale
    z = torch.randint(lo, hi + 1, (n, k // group), dtype=torch.int32, generator=g) if asym else None
    return q, s, z


def run(x, w, mode, bias=None, isa=BEST, threads=2):
    qkern.set_isa(isa)
    qkern.set_num_threads(threads)
    return W.gemm_w23(x, w, bias, mode)


# ---- layout ---------------------------------------------------------------------------------

def bit_position(bits: int, c: int) -> list[tuple[int, int]]:
    """(word, bit) of each bit of code c (LSB first) inside a row's block, from the spec."""
    if bits == 2:
        i, j, p = c // 16, c % 4, (c % 16) // 4
        return [(i, 8 * j + 2 * p), (i, 8 * j + 2 * p + 1)]
    if c < 24:
        i, j, h = c // 8, c % 4, (c % 8) // 4
        return [(i, 8 * j + 3 * h + e) for e in range(3)]
    i, j = (c - 24) // 4, c % 4
    return [(i, 8 * j + 6), (i, 8 * j + 7), (2, 8 * j + 6 + i)]


def packed_ref(u: np.ndarray, bits: int) -> np.ndarray:
    """The documented layout from the unsigned codes u (N, K): tile t, block b, word i, row r."""
    n, k = u.shape
    npad = (n + 7) // 8 * 8
    uu = np.zeros((npad, k), np.int64)
    uu[:n] = u
    words = np.zeros((npad // 8, k // 32, bits, 8), np.uint32)
    for c in range(32):
        for e, (i, bit) in enumerate(bit_position(bits, c)):
            b = (uu[:, c::32] >> e) & 1  # (npad, k // 32)
            words[:, :, i, :] |= (b.reshape(npad // 8, 8, k // 32).transpose(0, 2, 1)
                                  .astype(np.uint32) << np.uint32(bit))
    return words.astype("<u4").view(np.uint8).reshape(npad // 8, k // 32, 32 * bits)


def test_bit_map_is_a_bijection():
    for bits in (2, 3):
        pos = [p for c in range(32) for p in bit_position(bits, c)]
        assert sorted(pos) == [(i, b) for i in range(bits) for b in range(32)]


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (8, 32), (9, 96), (33, 128)])
def test_pack_layout_and_roundtrip(n, k, bits, signed):
    q, s, z = make_weight(n, k, 32, True, bits, signed, seed=n)
    w = W.pack_weight(q, s, z, 32, bits)
    qmin = code_range(bits, signed)[0]
    assert w["qmin"] == qmin and w["bits"] == bits and w["packed"].dtype == torch.uint8
    npad = (n + 7) // 8 * 8
    assert w["packed"].numel() == npad * k * bits // 8  # exactly `bits` bits per weight
    u = q.numpy().astype(np.int64) - qmin
    assert np.array_equal(w["packed"].numpy(), packed_ref(u, bits))
    assert w["scales"].shape == (npad // 8, k // 32, 8)
    assert torch.equal(w["scales"][0, :, 0], s[0])
    c2, s2, z2 = W.unpack_weight(w)
    assert c2.dtype == q.dtype
    assert torch.equal(c2, q) and torch.equal(s2, s) and torch.equal(z2, z)
    assert np.array_equal(qkern._C.unpack_w23(w["packed"].numpy(), n, k, bits), u)


def test_pack_errors():
    q, s, z = make_weight(4, 96, 32, True, 2)
    with pytest.raises(ValueError, match="bits must be 2 or 3"):
        W.pack_weight(q, s, z, 32, 4)
    with pytest.raises(ValueError, match="multiple of group_size"):
        W.pack_weight(q, s[:, :1], None, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        W.pack_weight(q[:, :48], s, None, 48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        W.pack_weight(q[:, :40], s, None, 32)
    with pytest.raises(ValueError, match=r"int2 codes must be in \[-2, 1\]"):
        W.pack_weight(q.clone().fill_(2), s, None, 32, 2)
    with pytest.raises(ValueError, match=r"uint2 codes must be in \[0, 3\]"):
        W.pack_weight(q.clone().fill_(4).to(torch.uint8), s, None, 32, 2)
    with pytest.raises(ValueError, match=r"int3 codes must be in \[-4, 3\]"):
        W.pack_weight(q.clone().fill_(-5), s, None, 32, 3)
    with pytest.raises(ValueError, match="zero points"):
        W.pack_weight(q, s, z + 3, 32, 2)
    with pytest.raises(ValueError, match="scales must be"):
        W.pack_weight(q, s[:, :2], None, 32)
    with pytest.raises(ValueError, match="integer tensor"):
        W.pack_weight(q.float(), s, None, 32)
    with pytest.raises(ValueError, match="multiple of group_size"):
        qkern._C.pack_w23(q.numpy().astype(np.uint8), 2, 64)
    with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
        qkern._C.pack_w23(np.full((4, 32), 4, np.uint8), 2, 32)
    with pytest.raises(ValueError, match="bits must be 2 or 3"):
        qkern._C.pack_w23(np.zeros((4, 32), np.uint8), 1, 32)
    w = W.pack_weight(q, s, z, 32)
    with pytest.raises(ValueError, match="K = 96"):
        W.gemm_w23(torch.randn(2, 64), w)
    with pytest.raises(ValueError, match="mode"):
        W.gemm_w23(torch.randn(2, 96), w, mode="slow")
    with pytest.raises(ValueError, match="floating point"):
        W.gemm_w23(torch.ones(2, 96, dtype=torch.int32), w)
    ops = torch.ops.qkern.gemm_w23
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="scales"):
        ops(x, w["packed"], s, None, None, 4, 96, 32, 2, -2, 0)
    with pytest.raises(ValueError, match="bits must be 2 or 3"):
        ops(x, w["packed"], w["scales"], None, None, 4, 96, 32, 5, -2, 0)
    with pytest.raises(ValueError, match="qmin"):
        ops(x, w["packed"], w["scales"], None, None, 4, 96, 32, 2, -4, 0)
    with pytest.raises(ValueError, match="packed has"):
        ops(x, w["packed"], w["scales"], None, None, 4, 96, 32, 3, -4, 0)
    with pytest.raises(ValueError, match="bias has"):
        ops(x, w["packed"], w["scales"], None, torch.randn(3), 4, 96, 32, 2, -2, 0)
    with pytest.raises(ValueError, match="mode must be"):
        ops(x, w["packed"], w["scales"], None, None, 4, 96, 32, 2, -2, 7)
    q8, s8, _ = make_weight(8, 96, 32, False, 3)  # N % 8 == 0: (N, K/G) has the right size
    w8 = W.pack_weight(q8, s8, None, 32, 3)
    with pytest.raises(ValueError, match="tile layout"):
        ops(x, w8["packed"], s8, None, None, 8, 96, 32, 3, -4, 1)


# ---- numerics -------------------------------------------------------------------------------

SHAPES = [  # M, N, K, G
    (1, 7, 32, 32), (3, 33, 96, 32), (17, 7, 2048, 128), (1, 33, 2048, 64),
    (17, 33, 1024, 32), (512, 7, 96, 32), (35, 16, 256, 128),
    # odd tile counts, 4-pair blocks of tiles and every row remainder of the AVX-512 kernels
    (2, 136, 128, 128), (5, 40, 64, 32), (7, 65, 96, 32), (13, 72, 256, 64),
    # the amx kernel's 16-row tiles with a remainder, an odd tile, groups of 1-4 blocks
    (40, 24, 256, 64), (33, 17, 128, 32), (16, 8, 384, 128),
]
FORMATS = [(2, True), (3, True), (2, False), (3, False)]


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{'' if f[1] else 'u'}int{f[0]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_all_paths_identical(shape, fmt, asym, mode):
    m, n, k, g = shape
    bits, signed = fmt
    q, s, z = make_weight(n, k, g, asym, bits, signed, seed=m + n + k + bits)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    bias = torch.randn(n) if asym else None
    w = W.pack_weight(q, s, z, g, bits)
    outs = [run(x, w, mode, bias, isa, t) for isa in ISAS for t in (1, 2)]
    (check_exact if mode == "exact" else check_fast)(outs[0], x, q, s, z, g, bias)
    for o in outs[1:]:  # scalar / AVX2 / AVX-512, 1 / 2 threads: the same bits
        assert torch.equal(o.view(torch.int32), outs[0].view(torch.int32))
    for isa in ISAS[1:]:  # each ISA's GEMV path (one row at a time) too
        rows = torch.cat([run(x[i : i + 1], w, mode, bias, isa) for i in range(m)])
        assert torch.equal(rows.view(torch.int32), outs[0].view(torch.int32))


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("m", [1, 512])
def test_large_gemv_gemm(m, mode, bits):
    n, k, g = 520, 4096, 128  # large enough for both modes to run on the pool
    q, s, z = make_weight(n, k, g, True, bits, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    w = W.pack_weight(q, s, z, g, bits)
    y = run(x, w, mode, threads=2)
    (check_exact if mode == "exact" else check_fast)(y, x, q, s, z, g)
    assert torch.equal(y, run(x, w, mode, threads=1))
    for isa in ISAS[:-1]:  # every other ISA: the same bits (scalar on the GEMV only: slow)
        if m == 1 or isa != "scalar":
            assert torch.equal(y, run(x, w, mode, isa=isa))
    if m > 1:  # the GEMM kernel against the GEMV kernel, a few rows
        for i in (0, 3, m - 1):
            assert torch.equal(y[i : i + 1], run(x[i : i + 1], w, mode))


def test_dequantized_weight_is_bit_exact():
    """x = identity rows: every output is float(q - z) * s, one rounding, as qkern.dequantize."""
    for bits, signed in FORMATS:
        n, k, g = 11, 128, 32
        q, s, z = make_weight(n, k, g, True, bits, signed, seed=bits, scale=1.7)
        want = (q.to(torch.int32) - z.repeat_interleave(g, 1)).float() * s.repeat_interleave(g, 1)
        w = W.pack_weight(q, s, z, g, bits)
        for isa in ISAS:
            got = run(torch.eye(k), w, "exact", isa=isa).T
            assert torch.equal(got, want)


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("bits", [2, 3])
def test_zero_rows_and_magnitudes(bits, mode, isa):
    m, n, k, g = 6, 12, 256, 64
    q, s, z = make_weight(n, k, g, True, bits, seed=5)
    q[3] = 0
    z[3] = 0  # a weight row of zeros
    s[5] = 0.0  # a row with zero scales
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    x[1] = 0.0  # an activation row of zeros
    x[2] *= 1e17  # large (products ~1e33: no overflow)
    x[4] *= 1e-20  # tiny but normal
    x[5, :32] = 0.0  # one zero block
    s2 = s.clone()
    s2[:, 0] *= 1e15
    for scales in (s, s2):
        w = W.pack_weight(q, scales, z, g, bits)
        y = run(x, w, mode, isa=isa)
        (check_exact if mode == "exact" else check_fast)(y, x, q, scales, z, g)
        assert bool((y[1] == 0).all()) and bool((y[:, 3] == 0).all()) and bool((y[:, 5] == 0).all())


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_activations(bad, bits, isa):
    """exact mode: IEEE propagation to that row only; fast mode: NonFiniteError (int8
    activation codes cannot hold NaN/Inf), like gemm_w4's fast mode and W8A8."""
    q, s, z = make_weight(9, 64, 32, False, bits)
    q[:, 5] = 1  # a nonzero weight where the NaN / Inf sits
    w = W.pack_weight(q, s, z, 32, bits)
    x = torch.randn(3, 64)
    x[0, 5] = bad
    y = run(x, w, "exact", isa=isa)
    assert bool(torch.isfinite(y[1:]).all())
    assert not bool(torch.isfinite(y[0]).any())
    with pytest.raises(qkern.ops.NonFiniteError, match="NaN or Inf"):
        run(x, w, "fast", isa=isa)
    x[0, 5] = 0.0
    assert bool(torch.isfinite(run(x, w, "fast", isa=isa)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_leading_dims(dtype):
    q, s, z = make_weight(10, 128, 64, True, 3)
    w = W.pack_weight(q, s, z, 64, 3)
    x = torch.randn(2, 3, 128).to(dtype)
    bias = torch.randn(10)
    for mode in ("exact", "fast"):
        y = W.gemm_w23(x, w, bias, mode)
        assert y.shape == (2, 3, 10) and y.dtype == torch.float32
        assert torch.equal(y, W.gemm_w23(x.float(), w, bias, mode))
    assert W.gemm_w23(x[0, 0], w).shape == (10,)
    assert W.gemm_w23(torch.empty(0, 128), w).shape == (0, 10)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("mode", [0, 1])
def test_opcheck(mode, bits):
    q, s, z = make_weight(13, 96, 32, True, bits)
    w = W.pack_weight(q, s, z, 32, bits)
    x = torch.randn(5, 96)
    args = (x, w["packed"], w["scales"], w["zeros"], torch.randn(13), 13, 96, 32, bits,
            w["qmin"], mode)
    torch.library.opcheck(torch.ops.qkern.gemm_w23.default, args)
    x3 = torch.randn(2, 1, 96)
    torch.library.opcheck(torch.ops.qkern.gemm_w23.default,
                          (x3, w["packed"], w["scales"], None, None, 13, 96, 32, bits, w["qmin"],
                           mode))


# ---- QuantLinear ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int2", "int3", "uint2", "uint3"])
@pytest.mark.parametrize("group_size,symmetric", [(32, True), (64, False), (128, False)])
def test_quantlinear_runs_w23(fmt, group_size, symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(256, 20)
    ql = QuantLinear.from_float(lin, fmt, group_size=group_size, symmetric=symmetric)
    assert ql.kernel == "w23_exact"
    qw = qkern.quantize(lin.weight.detach(), fmt, granularity="group", axis=1,
                        group_size=group_size, symmetric=symmetric)
    w = ql.dequantize_weight()
    assert torch.equal(w, qw.dequantize())  # bit-exact per weight
    x = torch.randn(5, 256)
    y = ql(x)
    ref = F.linear(x.double(), w.double(), lin.bias.double())
    mag = x.double().abs() @ w.double().abs().T + lin.bias.double().abs()
    # the kernel's bound plus the rounding of each dequantized weight (one u |x w| per product)
    bound = (group_size + 256 // group_size + 3) * 1.01 * U * mag
    assert bool(((y.double() - ref).abs() <= bound).all())
    fast = QuantLinear.from_float(lin, fmt, group_size=group_size, symmetric=symmetric,
                                  mode="fast")
    assert fast.kernel == "w23_fast"
    assert torch.equal(fast.dequantize_weight(), w)
    _, d = quantize_x_ref(x)
    step = d.repeat_interleave(32, 1).double()
    assert bool(((fast(x).double() - ref).abs() <= (step / 2) @ w.double().abs().T
                 + 1e-5 * mag + 1e-6).all())


def test_quantlinear_other_grids_do_not_use_w23():
    lin = nn.Linear(96, 8)
    assert QuantLinear.from_float(lin, "int3", group_size=None).kernel == "dequant"  # channel
    assert QuantLinear.from_float(lin, "int2", group_size=48).kernel == "dequant"
    assert QuantLinear.from_float(lin, "ternary", group_size=32).kernel != "w23_exact"
    assert QuantLinear.from_float(lin, "int2", group_size=32,
                                  quantizer="midrise").kernel == "dequant"


def test_quantlinear_w23_torch_compile_fullgraph():
    torch.manual_seed(3)
    model = nn.Sequential(QuantLinear.from_float(nn.Linear(128, 64), "int3", group_size=64,
                                                 symmetric=False),
                          nn.GELU(),
                          QuantLinear.from_float(nn.Linear(64, 8), "uint2", group_size=32,
                                                 mode="fast"))
    assert [m.kernel for m in (model[0], model[2])] == ["w23_exact", "w23_fast"]
    x = torch.randn(3, 128)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), model(x))
