"""CUDA quantized matmuls (qkern::gemm_w4, gemm_lut4, gemm_w8a8, gemm_w8a16) against the CPU
ops on the same packed buffers, and against float64 references written from docs/numerics.md.

Every test runs twice: "emu" executes the CUDA kernels' bodies on the host, thread by thread,
with every memory access bounds-checked (``qkern.ops.cuda.emulate``: needs ``qkern._cuda``, no
GPU), and "cuda" runs them on a GPU (skipped without one). Guarantees checked (docs/numerics.md
"CUDA matmuls"): gemm_w4 (exact and fast) and gemm_w8a8 give the CPU op's bits on every path;
gemm_w8a16's GEMM path gives the AVX2 bits when every CPU row tile has more than 3 rows;
gemm_lut4 and the other gemm_w8a16 paths are within their float32 accumulation bounds; on a GPU
every op gives exactly the emulation's bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

_cuda = pytest.importorskip("qkern._cuda", reason="qkern._cuda not built (no nvcc)")

import qkern  # noqa: E402
import qkern.ops.lut4 as L4  # noqa: E402
import qkern.ops.w4 as W4  # noqa: E402
from qkern import formats as F  # noqa: E402
from qkern.ops import NonFiniteError  # noqa: E402
from qkern.ops import cuda as C  # noqa: E402

OPS = torch.ops.qkern
U = 2.0 ** -24
HAS_GPU = torch.cuda.is_available() and _cuda.device_count() > 0
gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
WHERE = ["emu", pytest.param("cuda", marks=gpu)]
PATHS = ["auto", "gemv", "gemm"]
ISAS = ["scalar"] + (["avx2"] if qkern._C.cpu_has_avx2() else [])

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _dev(t):
    return t.cuda() if isinstance(t, torch.Tensor) else t


def run(where: str, op: str, *args, path="auto", reverse=False):
    """The CUDA implementation of ``op``: emulated on the host, or on the GPU (result on CPU)."""
    if where == "emu":
        return C.emulate(op, *args, path=path, reverse=reverse)
    return C.run_matmul(op, *(_dev(a) for a in args), path=path).cpu()


def same_bits(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Equal bit for bit, every NaN counting as equal to every NaN."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape)
    g, r = got.float().reshape(-1), ref.float().reshape(-1)
    nan = torch.isnan(g)
    assert torch.equal(nan, torch.isnan(r)), f"{what}: NaN positions differ"
    bad = (g.view(torch.int32) != r.view(torch.int32)) & ~nan
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ, first at {i}: "
                             f"{g[i].item()!r} vs cpu {r[i].item()!r}")


def within(got, ref64, bound, what=""):
    err = (got.double() - ref64).abs()
    worst = float((err - bound).max()) if err.numel() else 0.0
    assert worst <= 0, f"{what}: error exceeds the bound by {worst:.3g}"


def make_x(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Normal rows of different magnitudes, a zero row, a row with a subnormal half and a huge
    half (fast-mode blocks with d < FLT_MIN and large d), exact quarter values (rounding ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(20).add(0.1)
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2, : k // 2] = 1e-40
        x[2, k // 2:] *= 1e15
    flat = x.view(-1)
    flat[::17] = torch.round(flat[::17] * 4) / 4
    return x


# ---- int4 group-wise ---------------------------------------------------------------------------

def make_w4(n, k, group, asym, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, k // group, generator=g) + 0.05) * 0.1
    z = torch.randint(-8, 8, (n, k // group), dtype=torch.int32, generator=g) if asym else None
    return q, s, z, W4.pack_weight(q, s, z, group)


def w4_args(w, bias, n, k, group, mode):
    return (w["packed"], w["scales"], w["zeros"], bias, n, k, group, mode)


# (M, N, K, G, asym): GEMV (M <= 8) and GEMM, N no multiple of 8, one group, many groups (two
# GEMV chunks of 64 groups), row chunks of the forced GEMV path (M = 17: 8 + 8 + 1).
W4_CASES = [(1, 13, 256, 64, True), (1, 1, 32, 32, False), (3, 21, 128, 32, True),
            (3, 9, 4096, 32, False), (8, 70, 192, 64, False), (9, 7, 96, 32, True),
            (17, 40, 256, 128, True), (512, 12, 128, 64, True)]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", W4_CASES)
@pytest.mark.parametrize("mode", [0, 1])
def test_w4_bits_equal_cpu(where, case, mode):
    m, n, k, group, asym = case
    _, _, _, w = make_w4(n, k, group, asym, seed=m + n)
    x = make_x(m, k, seed=k)
    for bias in (torch.randn(n), None):
        args = w4_args(w, bias, n, k, group, mode)
        ref = OPS.gemm_w4(x, *args)
        for path in PATHS:
            same_bits(run(where, "gemm_w4", x, *args, path=path), ref, f"{path} mode {mode}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", [0, 1])
def test_w4_emulation_reverse_threads_and_isas(isa, mode):
    # Threads in reverse order inside each step (a read of data written in the same step would
    # change the result), against both CPU paths.
    qkern.set_isa(isa)
    m, n, k, group = 17, 19, 320, 64
    _, _, _, w = make_w4(n, k, group, True, seed=3)
    x = make_x(m, k, seed=5)
    args = w4_args(w, torch.randn(n), n, k, group, mode)
    ref = OPS.gemm_w4(x, *args)
    for path in PATHS:
        same_bits(C.emulate("gemm_w4", x, *args, path=path, reverse=True), ref, path)


@pytest.mark.parametrize("where", WHERE)
def test_w4_against_float64(where):
    # Independent of the CPU kernels: the exact mode within gamma(G + K/G + 1) of the float64
    # product (docs/numerics.md), for GEMV and GEMM.
    n, k, group = 33, 512, 128
    q, s, z, w = make_w4(n, k, group, True, seed=11)
    deq = (q.double() - z.double().repeat_interleave(group, 1)) * \
        s.double().repeat_interleave(group, 1)
    bias = torch.randn(n)
    for m in (1, 40):
        x = torch.randn(m, k)
        ref = x.double() @ deq.T + bias.double()
        mag = x.double().abs() @ deq.abs().T + bias.double().abs()
        nterms = group + k // group + 1
        got = run(where, "gemm_w4", x, *w4_args(w, bias, n, k, group, 0))
        within(got, ref, nterms * U / (1 - nterms * U) * mag, f"m={m}")


@pytest.mark.parametrize("where", WHERE)
def test_w4_nonfinite(where):
    m, n, k, group = 3, 16, 64, 32
    _, _, _, w = make_w4(n, k, group, False)
    x = make_x(m, k)
    x[0, 5] = float("nan")
    x[2, 40] = float("inf")
    exact = w4_args(w, None, n, k, group, 0)
    for path in PATHS:  # exact mode: propagated per IEEE, where the CPU has them
        same_bits(run(where, "gemm_w4", x, *exact, path=path), OPS.gemm_w4(x, *exact), path)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        run(where, "gemm_w4", x, *w4_args(w, None, n, k, group, 1))


@pytest.mark.parametrize("where", WHERE)
def test_w4_leading_dims_dtypes_and_offsets(where):
    n, k, group = 10, 64, 32
    _, _, _, w = make_w4(n, k, group, True)
    x = torch.randn(2, 3, k) * 5  # finite in float16
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        xt = x.to(dt)
        ref = OPS.gemm_w4(xt, *w4_args(w, None, n, k, group, 1))
        got = run(where, "gemm_w4", xt, *w4_args(w, None, n, k, group, 1))
        assert got.shape == (2, 3, n) and got.dtype == torch.float32
        same_bits(got, ref, str(dt))
    # x at an address that is no multiple of 16 bytes (copied to an aligned buffer)
    buf = torch.empty(6 * k + 1)
    buf[1:] = x.reshape(-1)
    xm = buf[1:].view(2, 3, k)
    same_bits(run(where, "gemm_w4", xm, *w4_args(w, None, n, k, group, 0)),
              OPS.gemm_w4(x, *w4_args(w, None, n, k, group, 0)), "misaligned")


def test_w4_empty():
    _, _, _, w = make_w4(8, 64, 32, False)
    y = C.emulate("gemm_w4", torch.empty(0, 64), *w4_args(w, None, 8, 64, 32, 1))
    assert y.shape == (0, 8)


# ---- 4-bit lookup table --------------------------------------------------------------------------

def make_lut4(n, k, group, fmt="nf4", seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    s = torch.rand(n, k // group, generator=g) + 0.05
    table = torch.from_numpy(F.get(fmt).lut[:16].copy()).float()
    w32 = table[codes.long()] * s.repeat_interleave(group, 1)  # dequantize_lut: one product
    return L4.pack_weight(codes, s, group), table, w32


LUT_CASES = [(1, 13, 256, 64), (3, 21, 128, 32), (8, 5, 384, 128), (17, 40, 256, 128),
             (512, 9, 64, 32)]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", LUT_CASES)
@pytest.mark.parametrize("fmt", ["nf4", "fp4_e2m1", "fp4_bnb"])
def test_lut4_within_bounds(where, case, fmt):
    # Against float64 of the float32 weights: an FMA chain of K terms (GEMM) or per-lane chains
    # plus a 32-lane butterfly (GEMV), then the bias add: |err| <= (K + 1) u (sum|x w| + |b|).
    # Against the CPU op: twice that.
    m, n, k, group = case
    p, table, w32 = make_lut4(n, k, group, fmt, seed=m)
    x = make_x(m, k, seed=n)
    bias = torch.randn(n)
    ref = x.double() @ w32.double().T + bias.double()
    bound = (k + 1) * U * (x.double().abs() @ w32.double().abs().T + bias.double().abs())
    cpu = OPS.gemm_lut4(x, p["packed"], p["scales"], table, bias, n, k, group)
    for path in PATHS:
        got = run(where, "gemm_lut4", x, p["packed"], p["scales"], table, bias, n, k, group,
                  path=path)
        assert got.shape == (m, n) and got.dtype == torch.float32
        within(got, ref, bound, path)
        within(got, cpu.double(), 2 * bound, f"{path} vs cpu")


def test_lut4_emulation_reverse_threads():
    m, n, k, group = 11, 17, 128, 32
    p, table, _ = make_lut4(n, k, group)
    x = make_x(m, k)
    for path in PATHS:
        a = C.emulate("gemm_lut4", x, p["packed"], p["scales"], table, None, n, k, group,
                      path=path)
        b = C.emulate("gemm_lut4", x, p["packed"], p["scales"], table, None, n, k, group,
                      path=path, reverse=True)
        same_bits(a, b, path)


@pytest.mark.parametrize("where", WHERE)
def test_lut4_errors(where):
    p, table, _ = make_lut4(4, 64, 32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        run(where, "gemm_lut4", x, p["packed"], p["scales"], table, None, 4, 64, 16)
    with pytest.raises(ValueError, match="2-D"):
        run(where, "gemm_lut4", x.view(1, 2, 64), p["packed"], p["scales"], table, None, 4, 64,
            32)
    with pytest.raises(ValueError, match="packed has"):
        run(where, "gemm_lut4", x, p["packed"][:-1], p["scales"], table, None, 4, 64, 32)
    with pytest.raises(ValueError, match="table needs 16"):
        run(where, "gemm_lut4", x, p["packed"], p["scales"], table[:8], None, 4, 64, 32)


# ---- int8 weights --------------------------------------------------------------------------------

def make_w8(n, k, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    if extreme:
        codes = torch.where(torch.rand(n, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    else:
        codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    sw = torch.rand(n, generator=g) * 0.02 + 1e-3
    return codes, OPS.pack_w8(codes), sw


W8_CASES = [(1, 13, 37), (1, 1, 1), (3, 21, 128), (4, 16, 64), (8, 33, 4096), (9, 7, 33),
            (17, 40, 255), (512, 7, 33), (5, 3, 0)]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", W8_CASES)
def test_w8a8_bits_equal_cpu(where, case):
    m, n, k = case
    _, packed, sw = make_w8(n, k, seed=m + k)
    x = make_x(m, k, seed=n) if k else torch.randn(m, k)
    for bias in (torch.randn(n), None):
        ref = OPS.gemm_w8a8(x, packed, sw, bias, n, k)
        for path in PATHS:
            same_bits(run(where, "gemm_w8a8", x, packed, sw, bias, n, k, path=path), ref, path)


@pytest.mark.parametrize("where", WHERE)
def test_w8a8_int32_extremes_at_max_k(where):
    # The largest products at the largest K int32 can hold: the sums must be exact.
    k = C._W8A8_MAX_K
    codes = torch.tensor([[-128] * k, [127] * k, [-128, 127] * (k // 2)], dtype=torch.int8)
    packed, sw = OPS.pack_w8(codes), torch.tensor([1.0, 1.0, 1.0])
    x = torch.stack([torch.full((k,), -2.0), torch.full((k,), 3.0),
                     torch.tensor([5.0, -5.0] * (k // 2))])
    ref = OPS.gemm_w8a8(x, packed, sw, None, 3, k)
    assert float(ref[0, 0]) == pytest.approx(k * 127 * 128 * (2.0 / 127), rel=1e-6)
    for path in PATHS:
        same_bits(run(where, "gemm_w8a8", x, packed, sw, None, 3, k, path=path), ref, path)
    with pytest.raises(ValueError, match="exceeds"):
        run(where, "gemm_w8a8", torch.zeros(1, k + 1), OPS.pack_w8(torch.zeros(1, k + 1,
            dtype=torch.int8)), sw[:1], None, 1, k + 1)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("case", W8_CASES)
def test_w8a16_bounds_and_avx2_bits(where, case):
    m, n, k = case
    codes, packed, sw = make_w8(n, k, seed=m * 3 + k)
    x = make_x(m, k, seed=k) if k else torch.randn(m, k)
    bias = torch.randn(n)
    wd = codes.double() * sw.double()[:, None]
    ref = x.double() @ wd.T + bias.double()
    bound = (k + 4) * U * (x.double().abs() @ wd.abs().T + bias.double().abs()) + 1e-45
    for path in PATHS:
        got = run(where, "gemm_w8a16", x, packed, sw, bias, n, k, path=path)
        within(got, ref, bound, path)
    if "avx2" in ISAS and m % 96 not in (1, 2, 3):
        # Every CPU row tile has > 3 rows: the AVX2 kernel runs one FMA chain per output in k
        # order, as the CUDA GEMM kernel does.
        qkern.set_isa("avx2")
        ref_cpu = OPS.gemm_w8a16(x, packed, sw, bias, n, k)
        same_bits(run(where, "gemm_w8a16", x, packed, sw, bias, n, k, path="gemm"), ref_cpu)


def test_w8_emulation_reverse_threads():
    m, n, k = 10, 21, 77
    _, packed, sw = make_w8(n, k)
    x = make_x(m, k)
    for op in ("gemm_w8a8", "gemm_w8a16"):
        for path in PATHS:
            same_bits(C.emulate(op, x, packed, sw, None, n, k, path=path),
                      C.emulate(op, x, packed, sw, None, n, k, path=path, reverse=True),
                      f"{op} {path}")


@pytest.mark.parametrize("where", WHERE)
def test_w8_dtypes_nonfinite_and_errors(where):
    m, n, k = 4, 9, 40
    _, packed, sw = make_w8(n, k)
    x = (torch.randn(m, k) * 5).view(2, 2, k)  # finite in float16
    for dt in (torch.bfloat16, torch.float16):
        for op in ("gemm_w8a8", "gemm_w8a16"):
            got = run(where, op, x.to(dt), packed, sw, None, n, k)
            assert got.shape == (2, 2, n) and got.dtype == dt
            if op == "gemm_w8a8":
                same_bits(got, getattr(OPS, op)(x.to(dt), packed, sw, None, n, k), op)
    xn = x.clone()
    xn[1, 0, 3] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        run(where, "gemm_w8a8", xn, packed, sw, None, n, k)
    y = run(where, "gemm_w8a16", xn, packed, sw, None, n, k)  # propagated, that row only
    assert not bool(torch.isfinite(y[1, 0]).all()) and bool(torch.isfinite(y[0]).all())
    with pytest.raises(ValueError, match="packed_w must be"):
        run(where, "gemm_w8a16", x, packed[:-1], sw, None, n, k)
    with pytest.raises(ValueError, match="w_scale"):
        run(where, "gemm_w8a16", x, packed, sw[:-1], None, n, k)
    with pytest.raises(ValueError, match="K=41"):
        run(where, "gemm_w8a8", x, packed, sw, None, n, k + 1)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        run(where, "gemm_w8a8", x.double(), packed, sw, None, n, k)


# ---- the shared QK_HD helpers (csrc/core/matmul.h), called on the host ---------------------------

MM = _cuda.host_mm
F32 = np.float32


def test_helper_conversions_exact():
    for u in (0, 1, 7, 8, 15, 255, 2 ** 20 + 3, 2 ** 23 - 1):
        assert MM.float_of_small_uint(u) == float(u)
    for b in range(256):
        for t in range(4):
            word = (0xA5C3E17F & ~(0xFF << (8 * t))) | (b << (8 * t))
            assert MM.float_of_s8(word, t) == float(b - 256 if b >= 128 else b), (b, t)


def test_helper_nibbles_follow_the_packed_layouts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        u = rng.integers(0, 16, 8)
        # int4 tile layout (csrc/cpu/gemm/w4/api.h): byte j = u[j] | u[j + 4] << 4
        word = sum(int(u[j] | u[j + 4] << 4) << (8 * j) for j in range(4))
        assert [MM.w4_nibble(word, c) for c in range(8)] == list(u)
        assert MM.w4_low_nibbles(word).to_bytes(4, "little") == bytes(int(v) for v in u[:4])
        assert MM.w4_high_nibbles(word).to_bytes(4, "little") == bytes(int(v) for v in u[4:])
        # lut4: LSB-first nibble stream, element j in bits 4j .. 4j+3
        word = sum(int(u[j]) << (4 * j) for j in range(8))
        assert [MM.lut4_code(word, j) for j in range(8)] == list(u)
    # and on a real buffer: the word of row n, vector i of block b (docs/numerics.md offsets)
    q, _, _, w = make_w4(11, 64, 32, False, seed=4)
    flat = w["packed"].reshape(-1).numpy()
    for n in range(11):
        for k in range(0, 64, 8):
            b, i = k // 32, (k % 32) // 8
            off = ((n // 8) * 2 + b) * 128 + 32 * i + 4 * (n % 8)
            word = int.from_bytes(flat[off: off + 4].tobytes(), "little")
            assert [MM.w4_nibble(word, c) - 8 for c in range(8)] == q[n, k: k + 8].tolist()


def test_helper_dot4_and_block_dot():
    rng = np.random.default_rng(1)
    for _ in range(500):
        a, b = rng.integers(-128, 128, 4), rng.integers(-128, 128, 4)
        c = int(rng.integers(-2 ** 20, 2 ** 20))
        wa = int.from_bytes(a.astype(np.int8).tobytes(), "little")
        wb = int.from_bytes(b.astype(np.int8).tobytes(), "little")
        assert MM.dot4_s8(wa, wb, c) == int(a @ b) + c
        du, z, xs = int(rng.integers(-60960, 60961)), int(rng.integers(-8, 8)), \
            int(rng.integers(-4064, 4065))
        assert MM.w4_block_dot(du, 8.0 + z, float(xs)) == du - (8 + z) * xs


def w4_block_ref(x):
    """Fast-mode block quantization from docs/numerics.md, in numpy float32."""
    x = np.asarray(x, F32)
    if not np.isfinite(x).all():
        return [0] * len(x), float("nan"), 0
    d = F32(np.abs(x).max() / F32(127))
    if d < np.finfo(F32).tiny:
        return [0] * len(x), 0.0, 0
    q = np.clip(np.rint(x * (F32(1) / d)), -127, 127).astype(np.int64)
    return q.tolist(), float(d), int(q.sum())


def test_helper_w4_quantize_block():
    rng = np.random.default_rng(2)
    blocks = [rng.standard_normal(32) * 10 ** rng.uniform(-3, 3) for _ in range(50)]
    blocks += [np.zeros(32), np.full(32, 1e-40), np.arange(-16, 16) / 4 * 127 / 4,
               np.r_[rng.standard_normal(31), np.nan], np.r_[np.inf, rng.standard_normal(31)],
               np.full(32, -3e38)]
    for xb in blocks:
        codes, d, s = MM.w4_quantize_block(np.asarray(xb, F32).tolist())
        rc, rd, rs = w4_block_ref(xb)
        assert codes == rc and s == rs
        assert (np.isnan(d) and np.isnan(rd)) or d == rd


def test_helper_w8a8_row_matches_the_cpu_quantizer():
    rng = np.random.default_rng(3)
    for k in (1, 7, 100, 1000):
        for scale in (1e-42, 1e-3, 1.0, 1e30):
            x = (rng.standard_normal(k) * scale).astype(F32)
            x[:: max(1, k // 5)] = np.round(x[:: max(1, k // 5)] * 4) / 4
            codes, sx = MM.w8a8_row(x.tolist())
            c_ref, s_ref, _ = OPS.quantize_affine_dynamic(torch.from_numpy(x).view(1, k), k,
                                                          -127, 127, 0, 127.0, 0, 0, 0, 0.0, 0)
            assert codes == c_ref.view(torch.int8).reshape(-1).tolist()
            assert sx == float(s_ref[0])
    for acc, sx, sw, b in [(123456, 0.01, -0.5, 0.25), (-(2 ** 30) - 7, 3e-5, 7e-3, None),
                           (0, 1.0, -2.0, None)]:
        v = F32(F32(F32(acc) * F32(sx)) * F32(sw))
        if b is not None:
            v = F32(v + F32(b))
        got = MM.w8a8_value(acc, sx, sw, b)
        assert np.asarray(got, F32).view(np.uint32) == v.view(np.uint32)


# ---- argument errors, the raw module and its emulator's checks ----------------------------------

@pytest.mark.parametrize("where", WHERE)
def test_w4_errors(where):
    n, k, group = 8, 64, 32
    _, _, _, w = make_w4(n, k, group, True)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match="mode must be"):
        run(where, "gemm_w4", x, *w4_args(w, None, n, k, group, 2))
    with pytest.raises(ValueError, match=r"x must be \(..., K = 32\)"):
        run(where, "gemm_w4", x, *w4_args(w, None, n, 32, group, 0))
    with pytest.raises(ValueError, match="tile layout"):
        run(where, "gemm_w4", x, w["packed"], w["scales"].view(n, -1), None, None, n, k, group, 0)
    with pytest.raises(ValueError, match="packed has"):
        run(where, "gemm_w4", x, w["packed"].reshape(-1)[:-16], w["scales"], None, None, n, k,
            group, 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        run(where, "gemm_w4", x, *w4_args(w, None, n, k, 16, 0))
    with pytest.raises(ValueError, match="bias has"):
        run(where, "gemm_w4", x, *w4_args(w, torch.zeros(n + 1), n, k, group, 0))
    with pytest.raises(ValueError, match="path must be"):
        run(where, "gemm_w4", x, *w4_args(w, None, n, k, group, 0), path=7)


def test_device_mismatch_and_missing_gpu():
    _, _, _, w = make_w4(8, 64, 32, False)
    args = w4_args(w, None, 8, 64, 32, 0)
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        C.run_matmul("gemm_w4", torch.randn(1, 64), *args)
    if HAS_GPU:
        with pytest.raises(ValueError, match="expected a CPU tensor"):
            C.emulate("gemm_w4", torch.randn(1, 64).cuda(), *args)


def test_missing_cuda_module_message():
    # What the CUDA kernels of every op raise when qkern._cuda was not built.
    with pytest.raises(RuntimeError, match=r"qkern::gemm_w4: .*qkern._cuda is missing"):
        C._missing("gemm_w4")(torch.zeros(1))


def test_raw_emulator_checks():
    # Shapes the launchers refuse, and a vector-loaded buffer at an odd address: the raw
    # module says what is wrong instead of reading out of bounds.
    n, k, group = 8, 64, 32
    _, _, _, w = make_w4(n, k, group, False)
    x = torch.randn(1, k + 1)
    y = torch.empty(1, n)
    packed, scales = w["packed"].contiguous(), w["scales"].contiguous()
    common = (packed.data_ptr(), scales.data_ptr(), 0, 0, n, k, group, 0, 0, 0, 0, 0,
              y.data_ptr())
    with pytest.raises(ValueError, match="aligned"):
        _cuda.emulate_gemm_w4(x.data_ptr() + 4, 1, *common, 0, False)
    with pytest.raises(ValueError, match="group_size"):
        _cuda.emulate_gemm_w4(x.data_ptr(), 1, packed.data_ptr(), scales.data_ptr(), 0, 0, n, k,
                              48, 0, 0, 0, 0, 0, y.data_ptr(), 0, False)
    with pytest.raises(ValueError, match="mode"):
        _cuda.emulate_gemm_w4(x.data_ptr(), 1, packed.data_ptr(), scales.data_ptr(), 0, 0, n, k,
                              group, 3, 0, 0, 0, 0, y.data_ptr(), 0, False)
    with pytest.raises(ValueError, match="K exceeds"):
        _cuda.emulate_gemm_w8a8(0, 1, 0, 0, 0, 1, 200000, 0, 0, 0, 0, 0, False)
    # fast mode without its workspaces
    with pytest.raises(ValueError, match="invalid launch"):
        _cuda.emulate_gemm_w4(x.data_ptr(), 1, packed.data_ptr(), scales.data_ptr(), 0, 0, n, k,
                              group, 1, 0, 0, 0, 0, y.data_ptr(), 0, False)


# ---- on the GPU only ---------------------------------------------------------------------------

@gpu
def test_device_bits_equal_emulation():
    # The same kernels, the same float operations in the same order: the GPU gives the
    # emulation's bits for every op, including the float-accumulating ones.
    m, n, k, group = 5, 37, 256, 64
    x = make_x(m, k)
    bias = torch.randn(n)
    _, _, _, w = make_w4(n, k, group, True)
    p, table, _ = make_lut4(n, k, group)
    _, packed8, sw = make_w8(n, k)
    calls = [("gemm_w4", (x, *w4_args(w, bias, n, k, group, mode))) for mode in (0, 1)]
    calls += [("gemm_lut4", (x, p["packed"], p["scales"], table, bias, n, k, group))]
    calls += [(op, (x, packed8, sw, bias, n, k)) for op in ("gemm_w8a8", "gemm_w8a16")]
    for mrows in (m, 70):
        xr = make_x(mrows, k, seed=mrows)
        for op, args in calls:
            for path in PATHS:
                same_bits(run("cuda", op, xr, *args[1:], path=path),
                          C.emulate(op, xr, *args[1:], path=path), f"{op} {path} m={mrows}")


@gpu
def test_ops_dispatch_and_opcheck_on_cuda():
    n, k, group = 24, 128, 32
    _, _, _, w = make_w4(n, k, group, True)
    x = make_x(3, k).cuda()
    args = tuple(_dev(a) for a in w4_args(w, None, n, k, group, 1))
    same_bits(OPS.gemm_w4(x, *args).cpu(), OPS.gemm_w4(x.cpu(), *w4_args(w, None, n, k, group,
                                                                           1)))
    torch.library.opcheck(OPS.gemm_w4, (x, *args))
    _, packed, sw = make_w8(n, k)
    torch.library.opcheck(OPS.gemm_w8a8, (x, packed.cuda(), sw.cuda(), None, n, k))
    torch.library.opcheck(OPS.gemm_w8a16, (x, packed.cuda(), sw.cuda(), None, n, k))
    p, table, _ = make_lut4(n, k, group)
    torch.library.opcheck(OPS.gemm_lut4, (x, p["packed"].cuda(), p["scales"].cuda(),
                                          table.cuda(), None, n, k, group))


@gpu
@pytest.mark.parametrize("spec", [dict(fmt="int4", group_size=64, symmetric=False),
                                  dict(fmt="int4", group_size=32, mode="fast"),
                                  dict(fmt="nf4", group_size=64),
                                  dict(fmt="int8", group_size=None),
                                  dict(fmt="int8", group_size=None, act="int8_dynamic")])
def test_quantlinear_moved_to_cuda(spec):
    from qkern.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 72)
    q = QuantLinear.from_float(lin, **spec)
    x = torch.randn(2, 5, 256)
    ref = q(x)
    got = q.to("cuda")(x.cuda()).cpu()
    if q.kernel in ("w4_exact", "w4_fast", "w8a8"):
        same_bits(got, ref, q.kernel)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
