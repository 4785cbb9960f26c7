"""qkern::gemm_lut4 (fused 4-bit codebook matmul) against an independent float64 reference:
y = x @ (table[codes] * scales.repeat_interleave(G, 1)).T (+ bias)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import isas
import qkern
from qkern import formats
from qkern.ops import lut4

TABLES = ("nf4", "fp4_e2m1", "fp4_bnb")
ISAS = isas.params()
HAVE = isas.HAVE  # the loops below: every ISA this CPU has
EPS32 = 2.0**-24


def _table(name: str) -> torch.Tensor:
    return torch.from_numpy(formats.get(name).lut[:16].copy())


def _problem(m, n, k, g, seed=0, scale_mag=1.0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // g, generator=gen) + 0.05) * scale_mag
    b = torch.randn(n, generator=gen) if bias else None
    return x, codes, scales, b


def _reference(x, codes, scales, table, g, bias):
    w = table[codes.long()] * scales.repeat_interleave(g, 1)  # float32, as dequantize_lut
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    bound = x.double().abs() @ w.double().abs().T  # scale of the accumulation error
    return y, bound


def _run(x, codes, scales, table, g, bias):
    if g in (32, 64, 128):
        p = lut4.pack_weight(codes, scales, g)
        packed, sc = p["packed"], p["scales"]
    else:  # groups the raw op takes but pack_weight (CUDA's rule) does not: the same layout
        packed = torch.ops.qkern.pack_bits(codes.reshape(-1), 4, False).reshape(codes.shape[0], -1)
        sc = scales.contiguous()
    return torch.ops.qkern.gemm_lut4(x, packed, sc, table, bias, codes.shape[0], codes.shape[1], g)


def _check(y, ref, bound, k):
    assert y.dtype == torch.float32 and y.shape == ref.shape
    tol = 4.0 * k**0.5 * EPS32 * bound + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item()}, ratio {(err / tol).max()}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 13, 17, 256])
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("k,g", [(16, 16), (64, 32), (64, 64), (192, 64), (4096, 128), (4096, 32),
                                 (1024, 512), (208, 16), (224, 32)])
def test_shapes_vs_reference(isa, m, n, k, g):
    isas.use(isa)
    table = _table("nf4")
    x, codes, scales, b = _problem(m, n, k, g, seed=m * 1000 + n + k)
    y = _run(x, codes, scales, table, g, b)
    ref, bound = _reference(x, codes, scales, table, g, b)
    _check(y, ref, bound, k)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize("g", [16, 32, 64, 128, 256])
def test_tables_and_groups(isa, name, g):
    isas.use(isa)
    table = _table(name)
    x, codes, scales, b = _problem(5, 33, 768, g, seed=g)
    ref, bound = _reference(x, codes, scales, table, g, None)
    _check(_run(x, codes, scales, table, g, None), ref, bound, 768)
    x1 = x[:1]
    ref1, bound1 = _reference(x1, codes, scales, table, g, b)
    _check(_run(x1, codes, scales, table, g, b), ref1, bound1, 768)


@pytest.mark.parametrize("g", [16, 32])
def test_every_code_decodes_exactly(g):
    # one-hot x picks single weights: the result is exactly table[c] * s, on every path
    table = _table("nf4")
    k = 64
    codes = (torch.arange(16 * k) % 16).reshape(16, k).to(torch.uint8)
    codes = codes[:, torch.randperm(k, generator=torch.Generator().manual_seed(1))]
    scales = torch.rand(16, k // g) + 0.5
    eye = torch.eye(k)
    want = (table[codes.long()] * scales.repeat_interleave(g, 1)).T
    for isa in HAVE:
        isas.use(isa)
        for x in (eye, eye[:1], eye[:2]):
            assert torch.equal(_run(x, codes, scales, table, g, None), want[: x.shape[0]])


@pytest.mark.parametrize("isa", ISAS)
def test_zero_rows_and_large_scales(isa):
    isas.use(isa)
    table = _table("fp4_e2m1")
    m, n, k, g = 17, 33, 4096, 64
    x, codes, scales, b = _problem(m, n, k, g, seed=3, scale_mag=1e30)
    x[4] = 0.0
    codes[7] = 0  # fp4 code 0 = +0.0
    scales[9] = 0.0
    ref, bound = _reference(x, codes, scales, table, g, b)
    y = _run(x, codes, scales, table, g, b)
    _check(y, ref, bound, k)
    assert torch.isfinite(y).all()
    assert torch.equal(y[4], b) and torch.equal(y[:, 7], b[7].expand(m))
    assert torch.equal(y[:, 9], b[9].expand(m))


@pytest.mark.parametrize("m", [1, 2, 5, 65, 130])
@pytest.mark.parametrize("g", [16, 64, 512])
def test_every_isa_matches_scalar_and_threads_are_deterministic(m, g):
    table = _table("nf4")
    n, k = 257, 1024
    x, codes, scales, b = _problem(m, n, k, g, seed=m)
    ref, bound = _reference(x, codes, scales, table, g, b)
    out = {}
    for isa in HAVE:
        for threads in (1, 2):
            isas.use(isa)
            qkern.set_num_threads(threads)
            out[isa, threads] = y = _run(x, codes, scales, table, g, b)
            _check(y, ref, bound, k)
        assert torch.equal(out[isa, 1], out[isa, 2])
        _check(out[isa, 1], out["scalar", 1].double(), bound, k)


def test_non_finite_inputs_propagate():
    # NaN / Inf in x or in a scale: every path gives NaN / Inf exactly where the definition does
    table = _table("nf4")
    m, n, k, g = 3, 9, 256, 64
    x, codes, scales, _ = _problem(m, n, k, g, seed=21)
    codes[:, :] = 15  # table value 1.0 and positive scales: every weight > 0
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    scales[4, 2] = float("nan")
    col = torch.arange(n) == 4
    nan = torch.stack([col, torch.ones(n, dtype=torch.bool), col])
    inf = torch.stack([torch.zeros(n, dtype=torch.bool)] * 2 + [~col])
    for isa in HAVE:
        isas.use(isa)
        for rows in (slice(0, 3), slice(1, 2), slice(2, 3)):  # GEMM and GEMV paths
            y = _run(x[rows], codes, scales, table, g, None)
            assert torch.equal(y.isnan(), nan[rows]), isa
            assert torch.equal(y == float("inf"), inf[rows]), isa


def test_layout_is_lsb_nibble_stream_per_row():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    p = lut4.pack_weight(codes, torch.ones(5, 3), 32)
    assert p["packed"].shape == (5, 48) and p["packed"].dtype == torch.uint8
    flat = torch.ops.qkern.pack_bits(codes.reshape(-1), 4, False)
    assert torch.equal(p["packed"].reshape(-1), flat)


def test_wrapper_and_empty_batch():
    table = _table("fp4_bnb")
    x, codes, scales, b = _problem(6, 7, 64, 32, seed=9)
    p = lut4.pack_weight(codes, scales, 32)
    y = lut4.gemm_lut4(x.reshape(2, 3, 64), p, table=torch.from_numpy(
        formats.get("fp4_bnb").lut.copy()), bias=b)
    ref, bound = _reference(x, codes, scales, table, 32, b)
    assert y.shape == (2, 3, 7)
    _check(y.reshape(6, 7), ref, bound, 64)
    assert _run(x[:0], codes, scales, table, 32, b).shape == (0, 7)


def test_errors():
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group_size"):
        lut4.pack_weight(codes, torch.ones(4, 4), 16)
    with pytest.raises(ValueError, match="0..15"):
        lut4.pack_weight(codes + 16, torch.ones(4, 2), 32)
    p = lut4.pack_weight(codes, torch.ones(4, 2), 32)
    with pytest.raises(ValueError, match="does not divide"):
        torch.ops.qkern.gemm_lut4(torch.ones(1, 64), p["packed"], p["scales"], _table("nf4"),
                                  None, 4, 64, 48)
    with pytest.raises(ValueError, match="packed"):
        torch.ops.qkern.gemm_lut4(torch.ones(1, 64), p["packed"], p["scales"], _table("nf4"),
                                  None, 5, 64, 32)


@pytest.mark.parametrize("m", [1, 3])
def test_opcheck(m):
    x, codes, scales, b = _problem(m, 7, 128, 64, seed=4)
    p = lut4.pack_weight(codes, scales, 64)
    args = (x, p["packed"], p["scales"], _table("nf4"), b, 7, 128, 64)
    torch.library.opcheck(torch.ops.qkern.gemm_lut4.default, args)
    args = (x, p["packed"], p["scales"], _table("nf4"), None, 7, 128, 64)
    torch.library.opcheck(torch.ops.qkern.gemm_lut4.default, args)


# ---- double-quantized scales: qkern::gemm_lut4_dq ------------------------------------------

def _dq_weight(name, n, k, g, seed=0, mag=1.0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * mag
    w[:, :g] *= torch.rand(n, 1, generator=gen) * 10  # spread the block scales
    q = qkern.quantize(w, name, group_size=g, double_quant=True)
    assert q.double_quant is not None and q.axis == 1 and q.group_size == g
    return q


def _dq_scales_from_spec(dq):
    """Block scales rebuilt in numpy float32 from docs/numerics.md: max(c * s2 + mean, tiny)."""
    c = dq.codes.reshape(-1).numpy().astype(np.float32)
    s2 = dq.scale2.reshape(-1).numpy().astype(np.float32)
    idx = np.arange(c.size) // dq.group
    s = (c * s2[idx]).astype(np.float32) + np.float32(dq.mean)
    return torch.from_numpy(np.maximum(s, np.finfo(np.float32).tiny).astype(np.float32))


def _run_dq(x, q, bias=None):
    p = lut4.pack_weight_dq(q.codes, q.double_quant, q.group_size)
    return lut4.gemm_lut4_dq(x, p, _table(q.format.name), bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 2, 17])
def test_dq_vs_dequantize_reference(isa, name, g, m):
    isas.use(isa)
    n, k = 37, 1024  # 37 * 1024 / g blocks: several second-level groups, the last partial
    q = _dq_weight(name, n, k, g, seed=g + m)
    assert torch.equal(_dq_scales_from_spec(q.double_quant), q.scale.reshape(-1))
    gen = torch.Generator().manual_seed(m)
    x, b = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    w = q.dequantize()
    y = _run_dq(x, q, b)
    ref = x.double() @ w.double().T + b.double()
    bound = x.double().abs() @ w.double().abs().T + b.double().abs()
    _check(y, ref, bound, k)
    # same weights, same order: bit-identical with the float-scale kernel
    p = lut4.pack_weight(q.codes, q.scale, g)
    y_float = torch.ops.qkern.gemm_lut4(x, p["packed"], p["scales"], _table(name), b, n, k, g)
    assert torch.equal(y, y_float)


def test_dq_composite_for_other_devices_matches_cpu_kernel():
    # the CUDA registration rebuilds scales with torch ops, then runs gemm_lut4: same bits
    q = _dq_weight("nf4", 33, 512, 32, seed=11)
    p = lut4.pack_weight_dq(q.codes, q.double_quant, 32)
    assert torch.equal(lut4.dq_scales(p["qscales"], p["scale2"], p["mean"], p["dq_group"]),
                       q.scale.reshape(-1))
    x = torch.randn(3, 512)
    args = (x, p["packed"], p["qscales"], p["scale2"], p["mean"], _table("nf4"), None, 33, 512,
            32, p["dq_group"])
    assert torch.equal(lut4._gemm_lut4_dq_composite(*args), torch.ops.qkern.gemm_lut4_dq(*args))


@pytest.mark.parametrize("g", [32, 64])
def test_dq_every_weight_decodes_exactly(g):
    q = _dq_weight("nf4", 9, 256, g, seed=7)
    want = q.dequantize().T
    eye = torch.eye(256)
    for isa in HAVE:
        isas.use(isa)
        for x in (eye, eye[:1], eye[3:5]):
            rows = torch.nonzero(x)[:, 1]
            assert torch.equal(_run_dq(x, q), want[rows])


def test_dq_scale_clamp_and_second_level_groups():
    # hand-made second level: block scales that go to or below zero clamp to FLT_MIN; a small
    # dq_group puts every few blocks on their own scale2
    from qkern.tensor import DoubleQuant

    n, k, g, dqg = 4, 128, 32, 3
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    qs = torch.randint(-128, 128, (n * k // g,), generator=gen, dtype=torch.int8)
    qs[:4] = torch.tensor([-128, 0, 127, -1], dtype=torch.int8)
    s2 = torch.rand(-(-qs.numel() // dqg), generator=gen) * 0.01
    dq = DoubleQuant(qs, s2, 0.25, dqg)
    scales = _dq_scales_from_spec(dq)
    assert (scales == torch.finfo(torch.float32).tiny).any()
    table = _table("nf4")
    x = torch.randn(5, k, generator=gen)
    p = lut4.pack_weight_dq(codes, dq, g)
    pf = lut4.pack_weight(codes, scales, g)
    for isa in HAVE:
        isas.use(isa)
        for xx in (x, x[:1]):
            y = lut4.gemm_lut4_dq(xx, p, table)
            assert torch.equal(y, torch.ops.qkern.gemm_lut4(xx, pf["packed"], pf["scales"], table,
                                                            None, n, k, g))
        eye = torch.eye(k)
        assert torch.equal(lut4.gemm_lut4_dq(eye, p, table).T,
                           table[codes.long()] * scales.reshape(n, -1).repeat_interleave(g, 1))


@pytest.mark.parametrize("m", [1, 65])
def test_dq_avx2_matches_scalar_and_threads_are_deterministic(m):
    n, k, g = 257, 1024, 64
    q = _dq_weight("fp4_e2m1", n, k, g, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    w = q.dequantize()
    ref = x.double() @ w.double().T
    bound = x.double().abs() @ w.double().abs().T
    out = {}
    for isa in HAVE:
        for threads in (1, 2):
            isas.use(isa)
            qkern.set_num_threads(threads)
            out[isa, threads] = y = _run_dq(x, q)
            _check(y, ref, bound, k)
            # scales rebuilt in chunks of rows (128 here): no bit differs from float scales
            p = lut4.pack_weight(q.codes, q.scale, g)
            assert torch.equal(y, torch.ops.qkern.gemm_lut4(x, p["packed"], p["scales"],
                                                            _table("fp4_e2m1"), None, n, k, g))
        assert torch.equal(out[isa, 1], out[isa, 2])


def test_dq_errors():
    q = _dq_weight("nf4", 4, 128, 64)
    p = lut4.pack_weight_dq(q.codes, q.double_quant, 64)
    t = _table("nf4")
    op = torch.ops.qkern.gemm_lut4_dq
    x = torch.ones(1, 128)
    args = [x, p["packed"], p["qscales"], p["scale2"], p["mean"], t, None, 4, 128, 64, 256]
    with pytest.raises(ValueError, match="int8"):
        op(*args[:2], p["qscales"].to(torch.int32), *args[3:])
    with pytest.raises(ValueError, match="qscales"):
        op(*args[:2], p["qscales"][:-1], *args[3:])
    with pytest.raises(ValueError, match="scale2"):
        op(*args[:3], torch.ones(2), *args[4:])
    with pytest.raises(ValueError, match="mean"):
        op(*args[:4], torch.ones(2), *args[5:])
    with pytest.raises(ValueError, match="dq_group"):
        op(*args[:10], 0)
    with pytest.raises(ValueError, match="does not divide"):
        op(*args[:9], 48, 256)
    with pytest.raises(ValueError, match="int8 with"):
        lut4.pack_weight_dq(q.codes[:2], q.double_quant, 64)
    with pytest.raises(ValueError, match="group_size"):
        lut4.pack_weight_dq(q.codes, q.double_quant, 16)


@pytest.mark.parametrize("m", [1, 3])
def test_dq_opcheck(m):
    q = _dq_weight("nf4", 7, 128, 64, seed=4)
    p = lut4.pack_weight_dq(q.codes, q.double_quant, 64)
    x = torch.randn(m, 128)
    for bias in (torch.randn(7), None):
        args = (x, p["packed"], p["qscales"], p["scale2"], p["mean"], _table("nf4"), bias, 7, 128,
                64, p["dq_group"])
        torch.library.opcheck(torch.ops.qkern.gemm_lut4_dq.default, args)


@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize("m", [1, 9])
def test_quant_linear_double_quant_runs_lut4_dq(name, m):
    from torch import nn

    from qkern.nn import QuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(512, 48)
    ql = QuantLinear.from_float(lin, name, group_size=64, double_quant=True)
    assert ql.kernel == "lut4_dq"
    bufs = dict(ql.named_buffers())
    assert bufs["lut4_qscales"].dtype == torch.int8 and "lut4_scales" not in bufs
    q = qkern.quantize(lin.weight.detach(), name, group_size=64, double_quant=True)
    wq = ql.dequantize_weight()
    assert torch.equal(wq, q.dequantize())
    x = torch.randn(m, 512)
    y = ql(x)
    b = lin.bias.detach()
    ref = x.double() @ wq.double().T + b.double()
    bound = x.double().abs() @ wq.double().abs().T + b.double().abs()
    _check(y, ref, bound, 512)
    assert torch.allclose(y, torch.nn.functional.linear(x, wq, b), rtol=1e-5, atol=1e-5)
    plain = QuantLinear.from_float(lin, name, group_size=64)
    assert plain.kernel == "lut4"


# ---- many rows of x: the weight decoded by chunks for torch.mm (ops/lut4.py run_decoded) ----


def _fused(x, codes, scales, table, g, bias):
    """The fused kernel itself (whatever the row count), on the active ISA."""
    p = lut4.pack_weight(codes, scales, g)
    return lut4.run_gemm_lut4(x.contiguous(), p["packed"], p["scales"], table, bias,
                              codes.shape[0], codes.shape[1], g)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("chunk_bytes", [4096, None], ids=["4k", "default"])
@pytest.mark.parametrize("n,k,g", [(33, 1024, 64), (257, 256, 32), (40, 4096, 128)])
def test_decoded_path_vs_reference(isa, chunk_bytes, n, k, g, monkeypatch):
    """From DECODED_MIN_ROWS rows the op decodes W by chunks (several with 4 KiB chunks, N not
    a multiple of the chunk rows) into a reused buffer and multiplies with torch.mm: within the
    float32 sum's bound of the definition, for the float and the double-quantized scales."""
    import qkern.ops.decoded as decoded

    if chunk_bytes is not None:
        monkeypatch.setattr(decoded, "CHUNK_BYTES", chunk_bytes)
    isas.use(isa)
    table = _table("nf4")
    m = lut4.decoded_min_rows()
    x, codes, scales, b = _problem(m + 3, n, k, g, seed=n + k)
    ref, bound = _reference(x, codes, scales, table, g, b)
    for xx, rr, bb in ((x, ref, bound), (x[:m], ref[:m], bound[:m])):
        _check(_run(xx, codes, scales, table, g, b), rr, bb, k)
        assert torch.equal(_run(xx, codes, scales, table, g, b),
                           lut4.run_decoded(xx.contiguous(), *_packed(codes, scales, g),
                                            None, None, 0.0, 0, table, b, n, k, g))
    q = _dq_weight("nf4", n, k, g, seed=g)
    w = q.dequantize()
    y = _run_dq(x, q, b)
    _check(y, x.double() @ w.double().T + b.double(),
           x.double().abs() @ w.double().abs().T + b.double().abs(), k)
    # the same weights with float scales: the same decoded bits, the same product
    p = lut4.pack_weight(q.codes, q.scale, g)
    assert torch.equal(y, torch.ops.qkern.gemm_lut4(x, p["packed"], p["scales"], table, b, n,
                                                    k, g))


def _packed(codes, scales, g):
    p = lut4.pack_weight(codes, scales, g)
    return p["packed"], p["scales"]


def test_decode_weight_is_the_definition_and_the_threshold_is_by_isa():
    """decode_weight (the decoded path's rows, QuantLinear.dequantize_weight) is table[c] * s
    bit for bit, float and double-quantized scales, 1 or 2 threads; the op takes the fused
    kernel below DECODED_MIN_ROWS rows and the decoded path from there."""
    table = _table("fp4_e2m1")
    x, codes, scales, _ = _problem(1, 70, 512, 32, seed=5)
    want = table[codes.long()] * scales.repeat_interleave(32, 1)
    packed, sc = _packed(codes, scales, 32)
    q = _dq_weight("nf4", 70, 512, 64, seed=6)
    pd = lut4.pack_weight_dq(q.codes, q.double_quant, 64)
    for threads in (1, 2):
        qkern.set_num_threads(threads)
        got = lut4.decode_weight(packed, sc, None, None, 0.0, 0, table, 70, 512, 32)
        assert torch.equal(got, want)
        got = lut4.decode_weight(pd["packed"], None, pd["qscales"], pd["scale2"],
                                 float(pd["mean"]), pd["dq_group"], _table("nf4"), 70, 512, 64)
        assert torch.equal(got, q.dequantize())
    assert lut4.DECODED_MIN_ROWS == {"scalar": 32, "avx2": 128, "avx512": 128, "amx": 128}
    for isa in HAVE:
        isas.use(isa)
        assert lut4.decoded_min_rows() == lut4.DECODED_MIN_ROWS[isa]
    with pytest.raises(ValueError, match="not inside"):
        qkern._C.lut4_decode_raw(packed.data_ptr(), sc.data_ptr(), 0, 0, 0.0, 0,
                                 table.data_ptr(), 70, 60, 71, 512, 32, got.data_ptr())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [64, 130])
def test_fused_kernel_at_many_rows(isa, m):
    """The fused kernel keeps its own test at row counts the op now sends to the decoded path
    (several 64-row blocks of x), on every ISA and thread count."""
    isas.use(isa)
    table = _table("nf4")
    x, codes, scales, b = _problem(m, 257, 1024, 64, seed=m)
    ref, bound = _reference(x, codes, scales, table, 64, b)
    ys = []
    for threads in (1, 2):
        qkern.set_num_threads(threads)
        ys.append(_fused(x, codes, scales, table, 64, b))
        _check(ys[-1], ref, bound, 1024)
    assert torch.equal(ys[0], ys[1])
