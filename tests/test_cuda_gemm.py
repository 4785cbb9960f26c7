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

import pytest
import torch

_cuda = pytest.importorskip("qkern._cuda",
                            reason="qkern._cuda not built (no nvcc or no GPU; QKERN_CUDA=ON)")

import qkern  # noqa: E402
import qkern.ops.lut4 as L4  # noqa: E402
from cuda_gemm_data import (  # noqa: E402
    ISAS,
    OPS,
    PATHS,
    WHERE,
    U,
    gpu,
    make_w4,
    make_x,
    run,
    same_bits,
    to_device,
    w4_args,
    within,
)
from qkern import formats as F  # noqa: E402
from qkern.ops import NonFiniteError  # noqa: E402
from qkern.ops import cuda as C  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ---- int4 group-wise ---------------------------------------------------------------------------

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
    args = tuple(to_device(a) for a in w4_args(w, None, n, k, group, 1))
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
