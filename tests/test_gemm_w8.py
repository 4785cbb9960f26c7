"""int8-weight matmuls (qkern::pack_w8, gemm_w8a8, gemm_w8a16) against independent references:
int64 numpy for the W8A8 integer accumulation, numpy float32 for its epilogue (bit-exact, from
docs/numerics.md "int8 matmul"), torch float64 for W8A16, and torch's own dynamic quantized
Linear (fbgemm) for W8A8 within a stated bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.library import opcheck

import isas
import qkern
import qkern.ops.w8 as w8  # registers the ops (not yet imported by qkern.ops)
from qkern import _C
from qkern.ops import NonFiniteError

OPS = torch.ops.qkern
ISAS = isas.params(isas.WITH_AMX)
U = 2.0**-24  # float32 unit roundoff
F32_TINY = np.float32(np.finfo(np.float32).tiny)
MAX_K = 132104  # largest K with K * 127 * 128 <= 2^31 - 1


# ---- references, written from docs/numerics.md -------------------------------------------

def ref_pack(codes: np.ndarray) -> np.ndarray:
    n, k = codes.shape
    np_, kp = (n + 15) // 16 * 16, (k + 3) // 4 * 4
    full = np.zeros((np_, kp), np.int8)
    full[:n, :k] = codes
    return full.reshape(np_ // 16, 16, kp // 4, 4).transpose(0, 2, 1, 3).reshape(-1)


def ref_quant_rows(x: np.ndarray):
    """Per-row symmetric int8: scale = amax/127 (0 -> 1, < FLT_MIN -> FLT_MIN), codes
    clamp(rne(x * (1/scale)), -127, 127), all in float32."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    scale = np.where(scale > 0, np.maximum(scale, F32_TINY), np.float32(1.0)).astype(np.float32)
    r = (np.float32(1.0) / scale).astype(np.float32)
    t = (x * r[:, None]).astype(np.float32)
    return np.clip(np.rint(t), -127, 127).astype(np.int8), scale


def ref_w8a8(x, codes, sw, bias):
    xq, sx = ref_quant_rows(x)
    acc = xq.astype(np.int64) @ codes.astype(np.int64).T
    assert np.abs(acc).max(initial=0) < 2**31
    with np.errstate(over="ignore"):  # huge rows overflow to inf, as float32 does
        y = (acc.astype(np.float32) * sx[:, None]).astype(np.float32) * sw[None, :]
        if bias is not None:
            y = (y + bias[None, :]).astype(np.float32)
    return y.astype(np.float32)


def w8a16_bound(x, codes, sw, bias, isa=None):
    """|y - exact| <= (K + 4) u (s * sum_k |x q| + |b|): float32 summation of K products
    (gamma_K), then the scale multiply and the bias add (docs/numerics.md). The amx level from
    16 rows (x split into three bfloat16 pieces, tile sums hi and lo): (K + 3K/256 + 4) u."""
    k = codes.shape[1]
    mag = np.abs(x.astype(np.float64)) @ np.abs(codes.astype(np.float64)).T * np.abs(sw)[None, :]
    if bias is not None:
        mag = mag + np.abs(bias.astype(np.float64))[None, :]
    terms = k + 4 + (3 * k / 256 if isa == "amx" and x.shape[0] >= 16 else 0)
    return terms * U * mag + 1e-45


def ref_w8a16(x, codes, sw, bias):
    y = x.astype(np.float64) @ (codes.astype(np.float64) * sw.astype(np.float64)[:, None]).T
    return y if bias is None else y + bias.astype(np.float64)[None, :]


# ---- helpers -----------------------------------------------------------------------------

def make(m, n, k, seed=0, extreme=False, bias=True):
    g = np.random.default_rng(seed)
    if extreme:
        codes = np.where(g.random((n, k)) < 0.5, -128, 127).astype(np.int8)
    else:
        codes = g.integers(-128, 128, (n, k), dtype=np.int8)
    x = (g.standard_normal((m, k)) * g.uniform(0.01, 100.0, (m, 1))).astype(np.float32)
    sw = g.uniform(1e-3, 2e-2, n).astype(np.float32)
    b = g.standard_normal(n).astype(np.float32) if bias else None
    return x, codes, sw, b


def run(op, x, codes, sw, b, isa="avx2", threads=2):
    isas.use(isa)
    qkern.set_num_threads(threads)
    n, k = codes.shape
    packed = OPS.pack_w8(torch.from_numpy(codes))
    bt = None if b is None else torch.from_numpy(b)
    return op(torch.from_numpy(x), packed, torch.from_numpy(sw), bt, n, k).numpy()


def s8s8(xq, codes, isa, threads):
    isas.use(isa)
    qkern.set_num_threads(threads)
    (m, k), n = xq.shape, codes.shape[0]
    packed = _C.pack_w8(codes.reshape(-1), n, k)
    return _C.gemm_s8s8_s32(xq.reshape(-1), packed, m, n, k).reshape(m, n)


SHAPES = [(m, n, k) for m in (1, 3, 17) for n in (1, 7, 33) for k in (1, 31, 33, 4096)]
SHAPES += [(512, 7, 33), (512, 33, 4096), (4, 16, 64), (97, 40, 100), (6, 16, 8), (0, 7, 33)]


# ---- packing -----------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(1, 1), (7, 31), (16, 4), (33, 33), (17, 4096), (0, 5), (3, 0)])
def test_pack_layout_and_roundtrip(n, k):
    codes = np.random.default_rng(n * 131 + k).integers(-128, 128, (n, k), dtype=np.int8)
    packed = OPS.pack_w8(torch.from_numpy(codes))
    assert packed.dtype == torch.int8 and packed.numel() == w8.packed_nbytes(n, k)
    np.testing.assert_array_equal(packed.numpy(), ref_pack(codes))
    np.testing.assert_array_equal(w8.unpack_w8(packed, n, k).numpy(), codes)


# ---- W8A8: exact integer accumulation and bit-exact epilogue --------------------------------

@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_s8s8_accumulation_exact(m, n, k, isa):
    if isa == "scalar" and m * n * k > 2e7:
        k = 256
    g = np.random.default_rng(m + 7 * n + 131 * k)
    xq = g.integers(-127, 128, (m, k), dtype=np.int8)
    codes = g.integers(-128, 128, (n, k), dtype=np.int8)
    ref = xq.astype(np.int64) @ codes.astype(np.int64).T
    for threads in (1, 2):
        np.testing.assert_array_equal(s8s8(xq, codes, isa, threads).astype(np.int64), ref)


@pytest.mark.parametrize("isa", ISAS)
def test_s8s8_extremes_up_to_max_k(isa):
    # The largest products (-127 * -128, 127 * -128, ...) at the largest K int32 can hold.
    for k in (4096, MAX_K):
        xq = np.array([[-127] * k, [127] * k, [127, -127] * (k // 2)], np.int8)
        codes = np.array([[-128] * k, [127] * k, [-128, 127] * (k // 2)], np.int8)
        ref = xq.astype(np.int64) @ codes.astype(np.int64).T
        np.testing.assert_array_equal(s8s8(xq, codes, isa, 2).astype(np.int64), ref)
    assert ref.max() == MAX_K * 127 * 128 <= 2**31 - 1


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_w8a8_bit_exact(m, n, k, isa):
    if isa == "scalar" and m * n * k > 2e7:
        k = 256
    for bias in (True, False):
        x, codes, sw, b = make(m, n, k, seed=m * n + k, bias=bias)
        ref = ref_w8a8(x, codes, sw, b)
        for threads in (1, 2):
            got = run(OPS.gemm_w8a8, x, codes, sw, b, isa, threads)
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
def test_w8a8_special_rows(isa):
    # zero rows (scale 1, y = 0 * sw + b), huge and subnormal magnitudes, one-hot rows, and
    # weights at -128 / 127 only.
    # Huge rows sit at the overflow bound max|x| * K <= 2^120 (docs/numerics.md, "Overflow
    # bound"; K = 100, 2^113 * 100 < 2^120); past it the op raises (issue 9: the 1e36 / 3.4e38 /
    # FLT_MAX rows this test used returned Inf where the product was finite).
    x, codes, sw, b = make(9, 33, 100, seed=3, extreme=True)
    big = np.float32(2.0**113)
    x[0] = 0.0
    x[1] *= big / np.abs(x[1]).max()
    x[2] = np.float32(3e-41) * np.sign(x[2])  # amax/127 underflows: scale raised to FLT_MIN
    x[3] = 0.0
    x[3, 50] = -big
    x[4] = big * np.sign(x[4])
    np.testing.assert_array_equal(run(OPS.gemm_w8a8, x, codes, sw, b, isa),
                                  ref_w8a8(x, codes, sw, b))
    assert np.array_equal(run(OPS.gemm_w8a8, x, codes, sw, b, isa)[0], (0 * sw + b))
    for huge in (np.float32(1e36) * 100, np.float32(3.4e38), np.finfo(np.float32).max):
        x[4] = huge * np.sign(x[4])
        with pytest.raises(ValueError, match="2\\^120"):
            run(OPS.gemm_w8a8, x, codes, sw, b, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_w8a8_nonfinite_raises(isa):
    x, codes, sw, b = make(3, 7, 33)
    for bad in (np.nan, np.inf, -np.inf):
        x2 = x.copy()
        x2[1, 5] = bad
        with pytest.raises(NonFiniteError):
            run(OPS.gemm_w8a8, x2, codes, sw, b, isa)


# Row / column / k tails of the register tiles (AVX-512: 8 rows x 3 blocks, GEMV rows; AVX2:
# 4 rows x 1 block): every M = 1..8, 13, 64, 70; N = 1 block, 3 blocks minus a column, 4 blocks
# minus 14 columns (a 3-block group + 1), 7 blocks; K at 1, 2, 3, 5, 63, 64, 65, 259.
TAILS = [(m, n, k) for m in (1, 2, 3, 4, 5, 6, 7, 8, 13, 64, 70) for n in (16, 47, 50, 112)
         for k in (1, 3, 5, 64, 65, 259)]
TAILS += [(m, 47, k) for m in (2, 9) for k in (2, 63)]


@pytest.mark.parametrize("isa", ISAS)
def test_tiles_vs_reference_and_scalar(isa):
    """Every path against the int64 / numpy references and the scalar kernel, bit for bit, 1
    and 2 threads (the W8A8 codes use the full [-127, 127] range: the AVX-512 kernel biases
    them)."""
    for i, (m, n, k) in enumerate(TAILS):
        g = np.random.default_rng(i)
        xq = np.concatenate([np.full((1, k), -127), g.integers(-127, 128, (m - 1, k))])
        xq = xq.astype(np.int8)
        codes = g.integers(-128, 128, (n, k), dtype=np.int8)
        ref = xq.astype(np.int64) @ codes.astype(np.int64).T
        scalar = s8s8(xq, codes, "scalar", 1)
        for threads in (1, 2):
            got = s8s8(xq, codes, isa, threads)
            np.testing.assert_array_equal(got.astype(np.int64), ref)
            np.testing.assert_array_equal(got, scalar)
        x, codes, sw, b = make(m, n, k, seed=i, bias=i % 2 == 0)
        ref = ref_w8a8(x, codes, sw, b)
        scalar = run(OPS.gemm_w8a8, x, codes, sw, b, "scalar", 1)
        for threads in (1, 2):
            got = run(OPS.gemm_w8a8, x, codes, sw, b, isa, threads)
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
            np.testing.assert_array_equal(got.view(np.uint32), scalar.view(np.uint32))
            y = run(OPS.gemm_w8a16, x, codes, sw, b, isa, threads)
            bound = w8a16_bound(x, codes, sw, b, isa)
            assert np.all(np.abs(y - ref_w8a16(x, codes, sw, b)) <= bound)


@pytest.mark.parametrize("m,n,k", TAILS[::7] + [(8, 40, 4096), (100, 33, 300), (1, 4100, 4)])
def test_w8a16_avx512_matches_avx2(m, n, k):
    """The AVX-512 W8A16 kernels keep the AVX2 ones' float operations (f32_avx512.cpp): the
    GEMV's per-residue FMA chains added pairwise, the panel's one FMA chain per output in k
    order. So their outputs agree bit for bit, as well as each is within the bound."""
    for i in ("avx2", "avx512"):
        isas.use(i)
    x, codes, sw, b = make(m, n, k, seed=m + n + k, bias=k % 2 == 1)
    x[0, 0] = -0.0
    want = run(OPS.gemm_w8a16, x, codes, sw, b, "avx2", 2)
    for threads in (1, 2):
        got = run(OPS.gemm_w8a16, x, codes, sw, b, "avx512", threads)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# ---- W8A8 against torch's dynamic quantized Linear (fbgemm) ---------------------------------

@pytest.mark.filterwarnings("ignore:.*quantize_per_channel.*:UserWarning")
@pytest.mark.parametrize("m,n,k", [(1, 7, 31), (17, 33, 256), (64, 48, 1024)])
def test_w8a8_vs_torch_dynamic_linear(m, n, k):
    """torch quantizes activations per tensor, asymmetric, 7-bit on fbgemm (reduce_range), so
    it is not bit-comparable. Both are compared to the float64 product of the dequantized
    weights: each error is within half an activation step times sum_k |w|, and qkern's per-row
    scales make its error no larger than torch's on rows of different magnitudes."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("torch built without fbgemm")
    import torch.ao.nn.quantized.dynamic as nnqd

    x, codes, sw, b = make(m, n, k, seed=k)
    ours = run(OPS.gemm_w8a8, x, codes, sw, b).astype(np.float64)
    exact = ref_w8a16(x, codes, sw, b)
    wsum = np.abs(codes.astype(np.float64)) @ np.ones(k) * sw  # sum_k |w[n, k]|
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        qw = torch.quantize_per_channel(torch.from_numpy(codes.astype(np.float32) * sw[:, None]),
                                        torch.from_numpy(sw.astype(np.float64)),
                                        torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        assert np.array_equal(qw.int_repr().numpy(), codes)
        lin = nnqd.Linear(k, n)
        lin.set_weight_bias(qw, torch.from_numpy(b))
        theirs = lin(torch.from_numpy(x)).numpy().astype(np.float64)
    finally:
        torch.backends.quantized.engine = engine
    _, sx = ref_quant_rows(x)
    slack = 1e-5 * (np.abs(exact) + 1e-3)
    bound_ours = 0.5 * sx.astype(np.float64)[:, None] * wsum[None, :] * (1 + 1e-4) + slack
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    bound_torch = 0.5 * (hi - lo) / 127 * wsum[None, :] * (1 + 1e-4) + slack
    assert np.all(np.abs(ours - exact) <= bound_ours)
    assert np.all(np.abs(theirs - exact) <= bound_torch)
    assert np.all(np.abs(ours - theirs) <= bound_ours + bound_torch)
    assert np.sqrt(np.mean((ours - exact) ** 2)) <= np.sqrt(np.mean((theirs - exact) ** 2))


# ---- W8A16 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_w8a16_vs_float64(m, n, k, isa):
    if isa == "scalar" and m * n * k > 2e7:
        k = 256
    for bias in (True, False):
        x, codes, sw, b = make(m, n, k, seed=m + n + k, bias=bias)
        exact, bound = ref_w8a16(x, codes, sw, b), w8a16_bound(x, codes, sw, b, isa)
        first = None
        for threads in (1, 2):
            got = run(OPS.gemm_w8a16, x, codes, sw, b, isa, threads)
            assert got.dtype == np.float32 and got.shape == (m, n)
            assert np.all(np.abs(got - exact) <= bound)
            if first is None:
                first = got
            np.testing.assert_array_equal(got, first)  # thread count does not change results


def test_w8a16_half_inputs_and_leading_dims():
    x, codes, sw, b = make(2 * 3 * 5, 33, 96, seed=5)
    packed = OPS.pack_w8(torch.from_numpy(codes))
    for dt in (torch.bfloat16, torch.float16):
        xt = torch.from_numpy(x).to(dt).view(2, 3, 5, 96)
        for op in (OPS.gemm_w8a16, OPS.gemm_w8a8):
            y = op(xt, packed, torch.from_numpy(sw), torch.from_numpy(b), 33, 96)
            assert y.dtype == dt and y.shape == (2, 3, 5, 33)
            y32 = op(xt.float(), packed, torch.from_numpy(sw), torch.from_numpy(b), 33, 96)
            assert torch.equal(y, y32.to(dt))


@pytest.mark.parametrize("isa", ISAS)
def test_w8a16_nonfinite_propagates_per_row(isa):
    x, codes, sw, b = make(40, 33, 64, seed=2)
    x[2, 7] = np.nan
    x[5, 63] = np.inf
    x[21, 0] = -np.inf
    for m in (1, 3, 8, 40):  # GEMV (1 and 3 rows), panel kernels, amx tiles (16 rows up)
        y = run(OPS.gemm_w8a16, x[:m], codes, sw, b, isa)
        finite = np.isfinite(y).all(axis=1)
        assert finite.tolist() == [i not in (2, 5, 21) for i in range(m)]


def g_sub(k, seed):
    """k float32 subnormals of both signs."""
    g = np.random.default_rng(seed)
    return (g.uniform(-1, 1, k) * 2.0**-127).astype(np.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k", [(16, 64), (37, 1000), (48, 33)])
def test_w8a16_rows_out_of_the_tiles_range(isa, m, k):
    """Rows with values the amx level's bfloat16 pieces cannot carry (subnormal pieces are
    flushed by the tile unit) go to the AVX-512 kernel: tiny, subnormal and huge values, alone
    or among ordinary ones, keep the float32 bound relative to their own magnitude."""
    x, codes, sw, b = make(m, 40, k, seed=m + k, bias=False)
    x[0] *= np.float32(1e-37)                      # pieces below float32's normal range
    x[1] = g_sub(k, m)                              # subnormals only
    x[7, :3] = [1e-42, -3e-39, 5e-45]             # subnormals among ordinary values
    x[8] *= np.float32(1e-25)                      # every value below 2^-64
    x[2] *= np.float32(1e25)                       # above 2^64
    x[3, 5] = np.float32(2.0**-64)                 # the range's edges stay in the tiles
    x[4, 6] = np.float32(-(2.0**64))
    x[5] = 0.0
    x[6, 1::2] = 0.0
    for threads in (1, 2):
        y = run(OPS.gemm_w8a16, x, codes, sw, b, isa, threads)
        err = np.abs(y - ref_w8a16(x, codes, sw, b))
        assert np.all(err <= w8a16_bound(x, codes, sw, b, isa)), err.max()
        np.testing.assert_array_equal(y[5], np.zeros(40, np.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_w8a16_one_hot_rows_exact(isa):
    """One nonzero activation per row and power-of-two weights: every path returns
    float32(float32(x q) * s), bit for bit. On the amx level that needs all 24 bits of x from
    its three bfloat16 pieces (values spread over the whole mantissa)."""
    m, n, k = 48, 33, 96
    g = np.random.default_rng(11)
    mant = g.integers(2**23, 2**24, m).astype(np.float64)
    vals = (mant * 2.0 ** g.integers(-40, 10, m) * g.choice([-1, 1], m)).astype(np.float32)
    at = g.integers(0, k, m)
    x = np.zeros((m, k), np.float32)
    x[np.arange(m), at] = vals
    codes = (g.choice([-1, 1], (n, k)) * 2 ** g.integers(0, 7, (n, k))).astype(np.int8)
    sw = g.uniform(1e-3, 2e-2, n).astype(np.float32)
    want = (vals[:, None] * codes[:, at].T.astype(np.float32)).astype(np.float32) * sw[None, :]
    got = run(OPS.gemm_w8a16, x, codes, sw, None, isa)
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
def test_empty_k_and_m(isa):
    _, codes, sw, b = make(1, 7, 0, seed=1)
    x = np.zeros((3, 0), np.float32)
    for op in (OPS.gemm_w8a8, OPS.gemm_w8a16):
        y = run(op, x, codes, sw, b, isa)
        np.testing.assert_array_equal(y, np.broadcast_to(0 * sw + b, (3, 7)))
        assert run(op, np.zeros((0, 0), np.float32), codes, sw, b, isa).shape == (0, 7)


# ---- op plumbing -----------------------------------------------------------------------------

def test_opcheck():
    x, codes, sw, b = make(5, 33, 40, seed=9)
    packed = OPS.pack_w8(torch.from_numpy(codes))
    xt, swt, bt = torch.from_numpy(x), torch.from_numpy(sw), torch.from_numpy(b)
    opcheck(OPS.pack_w8.default, (torch.from_numpy(codes),))
    for op in (OPS.gemm_w8a8, OPS.gemm_w8a16):
        opcheck(op.default, (xt, packed, swt, bt, 33, 40))
        opcheck(op.default, (xt.view(5, 1, 40), packed, swt, None, 33, 40))
        opcheck(op.default, (xt[:1], packed, swt, bt, 33, 40))


def test_compile_fullgraph():
    x, codes, sw, b = make(4, 16, 32, seed=4)
    packed = OPS.pack_w8(torch.from_numpy(codes))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return OPS.gemm_w8a16(x, packed, torch.from_numpy(sw), None, 16, 32) + 1

    xt = torch.from_numpy(x)
    assert torch.equal(f(xt), OPS.gemm_w8a16(xt, packed, torch.from_numpy(sw), None, 16, 32) + 1)


def test_errors():
    x, codes, sw, b = make(2, 7, 33)
    packed = OPS.pack_w8(torch.from_numpy(codes))
    xt, swt = torch.from_numpy(x), torch.from_numpy(sw)
    for op in (OPS.gemm_w8a8, OPS.gemm_w8a16):
        with pytest.raises((ValueError, RuntimeError), match="K=32"):
            op(xt, packed, swt, None, 7, 32)
        with pytest.raises((ValueError, RuntimeError), match="packed_w"):
            op(xt, packed[:-1], swt, None, 7, 33)
        with pytest.raises((ValueError, RuntimeError), match="w_scale"):
            op(xt, packed, swt[:3], None, 7, 33)
        with pytest.raises((ValueError, RuntimeError), match="bias"):
            op(xt, packed, swt, swt[:3], 7, 33)
        with pytest.raises((ValueError, RuntimeError), match="float32"):
            op(xt.double(), packed, swt, None, 7, 33)
    with pytest.raises((ValueError, RuntimeError), match="int8"):
        OPS.pack_w8(torch.from_numpy(codes).to(torch.int16))
    k = MAX_K + 4
    big = OPS.pack_w8(torch.zeros(1, k, dtype=torch.int8))
    with pytest.raises((ValueError, RuntimeError), match="overflow"):
        OPS.gemm_w8a8(torch.zeros(1, k), big, torch.ones(1), None, 1, k)
    with pytest.raises(ValueError, match="-127"):
        _C.gemm_s8s8_s32(np.full(4, -128, np.int8), _C.pack_w8(np.ones(4, np.int8), 1, 4),
                         1, 1, 4)
