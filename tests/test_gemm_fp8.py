"""qkern::gemm_fp8 (FP8-weight matmul) against independent references: torch's own
float8_e4m3fn / float8_e5m2 dtypes decode the bytes, the product is taken in float64 and
checked within the float32 accumulation bound of docs/numerics.md "FP8 matmul"; one-hot
activations check every code's decoded weight bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import isas
import qkern
from qkern.nn import QuantLinear
from qkern.ops import fp8

U = 2.0**-24
ISAS = isas.params(isas.WITH_AMX)
HAVE = isas.HAVE  # the loops below: every ISA this CPU has
FMTS = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in opcheck


def _finite_codes(n, k, fmt, gen):
    c = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    bad = fp8._special_codes(c, fp8.FORMATS[fmt])
    return torch.where(bad, c & 0xF3, c)  # clear two exponent bits: a finite code


def _problem(m, n, k, g, fmt="fp8_e4m3", seed=0, scale_mag=1.0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    codes = _finite_codes(n, k, fmt, gen)
    ng = 1 if g is None else k // g
    scales = (torch.rand(n, ng, generator=gen) + 0.05) * scale_mag
    b = torch.randn(n, generator=gen) if bias else None
    return x, codes, scales, b


def _weight(codes, scales, fmt):
    """float32 value(code) * scale, decoded by torch's float8 dtype."""
    vals = codes.view(FMTS[fmt]).float()
    return vals * scales.repeat_interleave(codes.shape[1] // scales.shape[1], 1)


def _run(x, codes, scales, g, fmt, bias):
    if g in (16, 48):  # groups the raw op takes (multiples of 16) but pack_weight does not
        n, k = codes.shape
        return torch.ops.qkern.gemm_fp8(x, codes.contiguous(), scales.contiguous(), bias, n, k, g,
                                        fp8.FORMATS[fmt])
    p = fp8.pack_weight(codes, scales, g, fmt)
    return torch.ops.qkern.gemm_fp8(x, p["w"], p["scales"], bias, p["N"], p["K"],
                                    p["group_size"], p["fmt"])


def _terms(m, k):
    """The bound's multiple of u on the current ISA: (K + 8), and 3K/256 more on the amx
    level's tiles (16 rows up: bfloat16 pieces of x, sums hi and lo; docs/numerics.md)."""
    return k + 8 + (3 * k / 256 if qkern.get_isa() == "amx" and m >= 16 else 0)


def _check(y, x, w, bias):
    """Rigorous float32 bound for every path's order: _terms(M, K) u (sum |x w| + |bias|)."""
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    if bias is not None:
        ref, mag = ref + bias.double(), mag + bias.double().abs()
    k = x.shape[1]
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    tol = _terms(x.shape[0], k) * U * mag + 1e-300
    assert bool((err <= tol).all()), f"max err {err.max().item()}, ratio {(err / tol).max()}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 13, 17, 130])
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("k,g", [(64, 32), (192, 64), (128, None), (100, None), (37, None),
                                 (4096, 128), (48, 16), (144, 48), (1000, None), (5, None)])
def test_shapes_vs_reference(isa, fmt, m, n, k, g):
    isas.use(isa)
    x, codes, scales, b = _problem(m, n, k, g, fmt, seed=m * 1000 + n + k)
    _check(_run(x, codes, scales, g, fmt, b), x, _weight(codes, scales, fmt), b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("g", [None, 32, 64, 128])
def test_every_code_decodes_exactly(isa, fmt, g):
    # one-hot x picks single weights: the result is exactly float32(value * s), on the GEMV
    # (1-2 rows) and tiled (K rows) paths alike
    isas.use(isa)
    n, k = 16, 256
    codes = (torch.arange(n * k) % 256).to(torch.uint8).reshape(n, k)
    codes = codes[:, torch.randperm(k, generator=torch.Generator().manual_seed(1))]
    codes = torch.where(fp8._special_codes(codes, fp8.FORMATS[fmt]), 0, codes)
    ng = 1 if g is None else k // g
    scales = torch.rand(n, ng, generator=torch.Generator().manual_seed(2)) + 0.5
    want = _weight(codes, scales, fmt).T
    eye = torch.eye(k)
    for x in (eye, eye[:1], eye[5:7]):
        y = _run(x, codes, scales, g, fmt, None)
        rows = torch.nonzero(x)[:, 1]
        assert torch.equal(y, want[rows]), fmt


@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("g", [None, 64])
def test_matches_qkern_dequantize_bit_for_bit(fmt, g):
    w = torch.randn(24, 128) * 3
    if g is None:
        q = qkern.quantize(w, fmt, granularity="channel", axis=0)
    else:
        q = qkern.quantize(w, fmt, granularity="group", axis=1, group_size=g)
    want = q.dequantize()
    for isa in HAVE:
        isas.use(isa)
        for x in (torch.eye(128), torch.eye(128)[:2]):
            y = _run(x, q.codes, q.scale, g, fmt, None)
            assert torch.equal(y.T, want[:, : x.shape[0]])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("m", [1, 9])
def test_zero_rows_and_large_magnitudes(isa, fmt, m):
    isas.use(isa)
    n, k, g = 33, 512, 64
    x, codes, scales, b = _problem(m, n, k, g, fmt, seed=3, scale_mag=1e30)
    x = x * 1e-30
    x[m // 2] = 0.0
    codes[7] = 0  # +0.0
    scales[9] = 0.0
    codes[11] = 0x01  # smallest subnormal
    y = _run(x, codes, scales, g, fmt, b)
    _check(y, x, _weight(codes, scales, fmt), b)
    assert torch.isfinite(y).all()
    assert torch.equal(y[m // 2], b) and torch.equal(y[:, 7], b[7].expand(m))
    assert torch.equal(y[:, 9], b[9].expand(m))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 5])
def test_scales_near_float32_max(isa, m):
    # E4M3's GEMV folds 2^8 into the scale; scale * 256 overflows above 2^120: other order
    isas.use(isa)
    n, k = 9, 64
    x, codes, scales, _ = _problem(m, n, k, 32, "fp8_e4m3", seed=5)
    codes = codes & 0x87  # small values (|v| < 2^-5) keep every weight finite
    scales = scales * 2.0**126
    w = _weight(codes, scales, "fp8_e4m3")
    assert torch.isfinite(w).all() and not torch.isfinite(scales * 256).all()
    x = x * 2.0**-30
    _check(_run(x, codes, scales, 32, "fp8_e4m3", None), x, w, None)


@pytest.mark.parametrize("m", [1, 2, 5, 100])
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("k,g", [(1024, 128), (1008, None), (1024, 16)])
def test_every_isa_matches_scalar_and_threads_are_deterministic(m, fmt, k, g):
    n = 257
    x, codes, scales, b = _problem(m, n, k, g, fmt, seed=m)
    w = _weight(codes, scales, fmt)
    out, terms = {}, {}
    for isa in HAVE:
        for threads in (1, 2):
            isas.use(isa)
            qkern.set_num_threads(threads)
            out[isa, threads] = y = _run(x, codes, scales, g, fmt, b)
            _check(y, x, w, b)
            terms[isa] = _terms(m, k)
        assert torch.equal(out[isa, 1], out[isa, 2])
        _check(out[isa, 1], x, w, b)
        diff = (out[isa, 1].double() - out["scalar", 1].double()).abs()
        mag = x.double().abs() @ w.double().abs().T + b.double().abs()
        both = (terms[isa] + terms["scalar"]) * U * mag  # both within their bounds
        assert bool((diff <= both).all()), isa
    if m > 4 and "avx512" in HAVE:  # the tiled path: the same bits as AVX2
        assert torch.equal(out["avx512", 1], out["avx2", 1])


def test_special_codes_in_the_raw_op():
    # never produced by qkern's quantizer, rejected by pack_weight; the raw op reads the bit
    # pattern: E4M3 0x7f / 0xff as +-480, E5M2 Inf as Inf and NaN as NaN
    s = torch.full((4,), 2.0)
    e4 = torch.tensor([[0x7F], [0xFF], [0x7E], [0x01]], dtype=torch.uint8)  # N = 4, K = 1
    e5 = torch.tensor([[0x7C], [0xFC], [0x7D], [0x7B]], dtype=torch.uint8)
    for isa in HAVE:
        isas.use(isa)
        for m in (1, 3):  # GEMV and tiled paths
            x = torch.ones(m, 1)
            y = torch.ops.qkern.gemm_fp8(x, e4, s, None, 4, 1, 0, 0)
            assert y.tolist() == [[960.0, -960.0, 896.0, 2.0**-8]] * m
            y = torch.ops.qkern.gemm_fp8(x, e5, s, None, 4, 1, 0, 1)
            assert y[:, 0].eq(float("inf")).all() and y[:, 1].eq(float("-inf")).all()
            assert y[:, 2].isnan().all() and y[:, 3].eq(57344.0 * 2).all()
    with pytest.raises(ValueError, match="NaN/Inf codes"):
        fp8.pack_weight(e4, s, None, "fp8_e4m3")
    with pytest.raises(ValueError, match="NaN/Inf codes"):
        fp8.pack_weight(e5[2:], s[2:], None, "fp8_e5m2")


def test_wrapper_shapes_and_empty():
    x, codes, scales, b = _problem(6, 7, 64, 32, "fp8_e5m2", seed=9)
    p = fp8.pack_weight(codes, scales, 32, "fp8_e5m2")
    y = fp8.gemm_fp8(x.reshape(2, 3, 64), p, b)
    assert y.shape == (2, 3, 7)
    _check(y.reshape(6, 7), x, _weight(codes, scales, "fp8_e5m2"), b)
    assert _run(x[:0], codes, scales, 32, "fp8_e5m2", b).shape == (0, 7)
    assert _run(x, codes[:0], scales[:0], 32, "fp8_e5m2", None).shape == (6, 0)
    y16 = fp8.gemm_fp8(x.half(), p)  # half activations: converted to float32 exactly
    _check(y16, x.half().float(), _weight(codes, scales, "fp8_e5m2"), None)


def test_errors():
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group_size"):
        fp8.pack_weight(codes, torch.ones(4, 4), 16, "fp8_e4m3")
    with pytest.raises(ValueError, match="fmt"):
        fp8.pack_weight(codes, torch.ones(4), None, "fp8_e3m4")
    with pytest.raises(ValueError, match="scales"):
        fp8.pack_weight(codes, torch.ones(4, 2), None, "fp8_e4m3")
    with pytest.raises(ValueError, match="2-D"):
        fp8.pack_weight(codes.reshape(-1), torch.ones(4), None, "fp8_e4m3")
    op = torch.ops.qkern.gemm_fp8
    x, s = torch.ones(1, 64), torch.ones(4)
    with pytest.raises(ValueError, match="does not divide"):
        op(x, codes, torch.ones(4, 2), None, 4, 64, 48, 0)
    with pytest.raises(ValueError, match="multiple of 16"):
        op(x, codes, torch.ones(4, 8), None, 4, 64, 8, 0)
    with pytest.raises(ValueError, match="w \\(N \\* K codes\\)"):
        op(x, codes, torch.ones(5), None, 5, 64, 0, 0)
    with pytest.raises(ValueError, match="scales"):
        op(x, codes, torch.ones(3), None, 4, 64, 0, 0)
    with pytest.raises(ValueError, match="fmt"):
        op(x, codes, s, None, 4, 64, 0, 2)
    with pytest.raises(ValueError, match="x must be"):
        op(torch.ones(1, 32), codes, s, None, 4, 64, 0, 0)
    with pytest.raises(ValueError, match="bias"):
        op(x, codes, s, torch.ones(3), 4, 64, 0, 0)
    with pytest.raises(ValueError, match="uint8"):
        op(x, codes.float(), s, None, 4, 64, 0, 0)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("g", [None, 64])
def test_opcheck(m, g):
    x, codes, scales, b = _problem(m, 7, 128, g, seed=4)
    p = fp8.pack_weight(codes, scales, g, "fp8_e4m3")
    for bias in (b, None):
        args = (x, p["w"], p["scales"], bias, 7, 128, p["group_size"], 0)
        torch.library.opcheck(torch.ops.qkern.gemm_fp8.default, args)


@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("m", [1, 19])
def test_quant_linear_runs_fp8_kernel(fmt, group_size, m):
    torch.manual_seed(0)
    lin = nn.Linear(256, 40)
    ql = QuantLinear.from_float(lin, fmt, group_size=group_size)
    assert ql.kernel == "fp8"
    assert "fp8_w" in dict(ql.named_buffers())
    if group_size is None:
        q = qkern.quantize(lin.weight.detach(), fmt, granularity="channel", axis=0)
    else:
        q = qkern.quantize(lin.weight.detach(), fmt, granularity="group", axis=1,
                           group_size=group_size)
    wq = ql.dequantize_weight()
    assert torch.equal(wq, q.dequantize())  # the kernel's weights are qkern's dequantize
    x = torch.randn(m, 256)
    y = ql(x)
    _check(y, x, wq, lin.bias.detach())
    ref = F.linear(x, wq, lin.bias.detach())
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert ql(x.reshape(1, m, 256)).shape == (1, m, 40)


def test_quant_linear_unsupported_group_does_not_pick_fp8():
    lin = nn.Linear(64, 8)
    ql = QuantLinear.from_float(lin, "fp8_e4m3", group_size=16)
    assert ql.kernel == "dequant"
    x = torch.randn(3, 64)
    assert torch.allclose(ql(x), F.linear(x, ql.dequantize_weight(), lin.bias), atol=1e-5)


# ---- many rows of x: the weight decoded by chunks for torch.mm (ops/fp8.py run_decoded) ----


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("chunk_bytes", [4096, None], ids=["4k", "default"])
@pytest.mark.parametrize("n,k,g", [(33, 1024, 64), (257, 256, None), (40, 4096, 128)])
def test_decoded_path(isa, fmt, chunk_bytes, n, k, g, monkeypatch):
    """From DECODED_MIN_ROWS rows (where the ISA has no faster kernel) the op decodes W by
    chunks (several with 4 KiB chunks) into a reused buffer and multiplies with torch.mm:
    within the bound, and the same bits as run_decoded on the same operands; the decoded rows
    are torch's float8 values times the scales bit for bit."""
    import qkern.ops.decoded as decoded

    if chunk_bytes is not None:
        monkeypatch.setattr(decoded, "CHUNK_BYTES", chunk_bytes)
    isas.use(isa)
    low = fp8.decoded_min_rows()
    m = 40 if low is None else low + 3  # AVX2: the tiled kernel, still checked
    x, codes, scales, b = _problem(m, n, k, g, fmt, seed=n + k)
    w = _weight(codes, scales, fmt)
    y = _run(x, codes, scales, g, fmt, b)
    _check(y, x, w, b)
    p = fp8.pack_weight(codes, scales, g, fmt)
    args = (p["w"], p["scales"], b, n, k, p["group_size"], p["fmt"])
    assert fp8.use_decoded(m) == (low is not None)
    if low is not None:
        assert torch.equal(y, fp8.run_decoded(x, *args))
    out = torch.empty(n - 3, k)
    qkern._C.fp8_decode_raw(p["w"].data_ptr(), p["scales"].data_ptr(), n, 2, n - 1, k,
                            p["group_size"], p["fmt"], out.data_ptr())
    assert torch.equal(out, w[2:n - 1])


def test_decoded_threshold_by_isa():
    want = {"scalar": 32, "avx2": None, "avx512": 128, "amx": 128}
    assert fp8.DECODED_MIN_ROWS == want
    for isa in HAVE:
        isas.use(isa)
        low = None if isa == "amx" and qkern._C.cpu_has_amx_bf16() else want[isa]
        assert fp8.decoded_min_rows() == low
        assert not fp8.use_decoded(31)
        assert fp8.use_decoded(128) == (low is not None)
        assert not fp8.use_decoded(low - 1 if low else 4096)
    w, s = torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1)
    with pytest.raises(ValueError, match="not inside"):
        qkern._C.fp8_decode_raw(w.data_ptr(), s.data_ptr(), 4, 3, 5, 32, 0, 0, s.data_ptr())
