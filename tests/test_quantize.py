"""qkern.quantize / dequantize vs the numpy reference of docs/numerics.md, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import isas
import qkern
import reference as R
from _util import (
    CODEBOOK_FORMATS,
    INT_FORMATS,
    MX_FORMATS,
    assert_bits_equal,
    assert_codes_equal,
    np_codes,
    np_f32,
    run_codebook,
    run_int,
)

ROUNDINGS = list(R.ROUNDINGS)


def _data(rng, shape=(8, 96), outliers=True):
    x = rng.standard_normal(shape).astype(np.float32)
    if outliers:
        x.reshape(-1)[:: 37] *= 20
    return torch.from_numpy(x)


def _ties(qmax: int) -> torch.Tensor:
    """With amax = qmax the symmetric scale is exactly 1, so halves are exact ties."""
    k = np.arange(-2 * qmax, 2 * qmax + 1, dtype=np.float32) / 2
    return torch.from_numpy(np.concatenate([k, [float(qmax), -float(qmax)], k + 0.25]))


# ---------------------------------------------------------------------------- integer formats
@pytest.mark.parametrize("name", INT_FORMATS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_formats_default_granularity(name, symmetric, rng):
    if name == "int1" and symmetric:
        pytest.skip("int1 symmetric mid-tread has qmax = 0 (see test_int1_symmetric)")
    x = _data(rng)
    qt = run_int(x, name, symmetric=symmetric)
    assert qt.format.name == name and tuple(qt.shape) == (8, 96)
    assert_bits_equal(np_f32(qkern.dequantize(qt)), np_f32(qt.dequantize()), "qkern.dequantize")


def test_ternary(rng):
    x = _data(rng)
    qt = qkern.quantize(x, "ternary")
    codes, sc, _, deq = R.quantize_int(np_f32(x), "ternary")
    np.testing.assert_array_equal(np_f32(qt.dequantize()), deq)
    vals = np_f32(qt.dequantize()) / float(sc)
    assert set(np.unique(vals).tolist()) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(np.rint(vals), codes)


def test_int1_symmetric(rng):
    """int1 = codes {-1, 0}: per spec qmax = 0, so only mid-rise gives a usable symmetric scale."""
    x = _data(rng)
    run_int(x, "int1", quantizer="midrise")
    run_int(x, "int1", symmetric=False)
    for quantizer in ("midtread", "deadzone"):  # scale = amax / 0: refuse cleanly or stay finite
        try:
            qt = qkern.quantize(x, "int1", quantizer=quantizer)
        except ValueError as e:
            assert "int1" in str(e)
        else:
            assert np.isfinite(np_f32(qt.scale)).all(), quantizer
            assert np.isfinite(np_f32(qt.dequantize())).all(), quantizer


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", INT_FORMATS + ["ternary"])
def test_rounding_modes_exact_ties(name, rounding):
    qmax = R.int_range(name)[1]
    x = _ties(max(qmax, 1))
    if name != "int1":  # int1: qmax = 0, no symmetric mid-tread scale
        run_int(x, name, rounding=rounding, seed=11)
        run_int(x, name, rounding=rounding, seed=11, scale=0.5)
    if name != "ternary":  # ternary is symmetric only
        run_int(x * 3 + 1, name, rounding=rounding, seed=3, symmetric=False)
        # asymmetric with an exact scale: (hi - lo) / (qmax - qmin) = 1 -> halves are ties
        qmin = R.int_range(name)[0]
        y = torch.cat([torch.tensor([float(qmin), float(qmax)]), _ties(max(qmax, 1)) / 2])
        run_int(y, name, rounding=rounding, seed=4, symmetric=False)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_rounding_modes_random(rounding, symmetric, rng):
    x = _data(rng, (16, 256))
    for name in ["int3", "int4", "int8", "uint2", "uint8"]:
        run_int(x, name, rounding=rounding, symmetric=symmetric, seed=123,
                granularity="group", group_size=32)


GRANULARITIES = [
    {"granularity": "tensor"},
    {"granularity": "channel"}, {"granularity": "channel", "axis": 1},
    {"granularity": "channel", "axis": 2}, {"granularity": "channel", "axis": -1},
    {"granularity": "group", "group_size": 4}, {"granularity": "group", "group_size": 12},
    {"granularity": "group", "axis": 0, "group_size": 3}, {"granularity": "group", "axis": 1,
                                                          "group_size": 5},
    {"granularity": "group", "axis": -2, "group_size": 10},
]


@pytest.mark.parametrize("gran", GRANULARITIES, ids=lambda g: "-".join(map(str, g.values())))
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("name,symmetric", [("int4", True), ("uint4", False), ("int8", False)])
def test_granularities_and_axes(gran, rounding, name, symmetric, rng):
    x = _data(rng, (6, 10, 12))
    qt = run_int(x, name, symmetric=symmetric, rounding=rounding, seed=99, **gran)
    v = R.View(x.shape, gran["granularity"], gran.get("axis"), gran.get("group_size"))
    if gran["granularity"] != "tensor":
        want = v.scale_shape_nd(np.zeros((v.rows, v.cols // v.group))).shape
        assert tuple(qt.scale.shape) == want


def test_given_scale_and_zero_point(rng):
    x = _data(rng, (4, 64))
    run_int(x, "int4", granularity="tensor", scale=0.37)
    s = torch.tensor([0.1, 0.2, 0.05, 1.5])
    run_int(x, "int8", granularity="channel", scale=s)
    z = torch.tensor([0, 3, 15, 8], dtype=torch.int32)
    run_int(x, "uint4", granularity="channel", scale=s, zero_point=z, symmetric=False)
    sg = torch.rand(4, 4) + 0.05
    run_int(x, "int4", granularity="group", group_size=16, scale=sg, rounding="stochastic",
            seed=5)


def test_clip_applies_first(rng):
    x = _data(rng, (4, 64))
    run_int(x, "int8", clip=(-1.0, 2.0))
    run_int(x, "uint8", clip=(-0.5, 0.5), symmetric=False, granularity="channel")


@pytest.mark.parametrize("quantizer", ["midrise", "deadzone"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", ["int2", "int4", "int8", "uint4"])
def test_midrise_and_deadzone(quantizer, rounding, name, rng):
    x = torch.cat([_data(rng, (512,)), _ties(R.int_range(name)[1]) * 1.5])
    widths = [1.0, 1.5, 2.0, 3.0] if quantizer == "deadzone" else [1.0]
    for w in widths:
        run_int(x, name, quantizer=quantizer, deadzone=w, rounding=rounding, seed=8)
        run_int(x, name, quantizer=quantizer, deadzone=w, rounding=rounding, seed=8,
                granularity="tensor", scale=0.5)


def test_deadzone_tie_constructed():
    # w = 1.5 -> h = 0.25; t = 0.75 gives a = 0.5 exactly: RNE -> 0, half_away -> 1
    x = torch.tensor([0.75, -0.75, 1.25, 0.2, 127.0])
    rne = qkern.quantize(x, "int8", quantizer="deadzone", deadzone=1.5, scale=1.0)
    away = qkern.quantize(x, "int8", quantizer="deadzone", deadzone=1.5, scale=1.0,
                          rounding="half_away")
    assert np_codes(rne).tolist() == [0, 0, 1, 0, 127]
    assert np_codes(away).tolist() == [1, -1, 1, 0, 127]


@pytest.mark.parametrize("w", [1.3, 1.7, 2.2])
def test_deadzone_width_float32_arithmetic(w):
    """h = (w - 1) * 0.5f in float32 (numerics.md); probe a = |t| - h right at the ties."""
    h = (np.float32(w) - np.float32(1)) * np.float32(0.5)
    centers = (np.arange(6, dtype=np.float32) + np.float32(0.5) + h).astype(np.float32)
    x = np.array([_step(c, s) for c in centers for s in range(-6, 7)], np.float32)
    x = torch.from_numpy(np.concatenate([x, -x]))
    for rounding in ("nearest_even", "half_away", "half_up"):
        run_int(x, "int8", quantizer="deadzone", deadzone=w, rounding=rounding, scale=1.0)


def _step(v: np.float32, k: int) -> np.float32:
    for _ in range(abs(k)):
        v = np.nextafter(v, np.float32(np.inf) if k > 0 else np.float32(-np.inf))
    return v


def test_midrise_levels():
    qt = qkern.quantize(torch.tensor([0.1, -0.1, 7.9, -9.0]), "int4", quantizer="midrise",
                        scale=1.0)
    assert np_codes(qt).tolist() == [0, -1, 7, -8]
    assert np_f32(qt.dequantize()).tolist() == [0.5, -0.5, 7.5, -7.5]


@pytest.mark.parametrize("name", ["int4", "int8", "uint8"])
def test_error_bound_inside_range(name, rng):
    x = _data(rng, (64, 128))
    sym = name.startswith("int")
    qt = qkern.quantize(x, name, granularity="group", group_size=32, symmetric=sym)
    deq = np_f32(qt.dequantize())
    scale = np.repeat(np_f32(qt.scale).reshape(64, -1), 32, axis=1)
    err = np.abs(np_f32(x) - deq)
    assert (err <= scale * (0.5 + 1e-5)).all(), err.max()


def test_degenerate_groups():
    x = torch.zeros(2, 32)
    x[1, 0] = 1e-42  # subnormal amax: scale raised to FLT_MIN
    run_int(x, "int8", granularity="group", group_size=16)
    run_int(x, "uint4", granularity="group", group_size=16, symmetric=False)
    run_codebook(x, "nf4", granularity="group", group_size=16)


# ------------------------------------------------------------------------------ stochastic
def test_stochastic_reproducible_across_threads_and_seeds(rng):
    x = _data(rng, (512, 1024))
    out = []
    for threads in (1, 2):
        qkern.set_num_threads(threads)
        out.append(np_codes(qkern.quantize(x, "int4", granularity="channel",
                                           rounding="stochastic", seed=42)))
    np.testing.assert_array_equal(out[0], out[1])
    other = np_codes(qkern.quantize(x, "int4", granularity="channel", rounding="stochastic",
                                    seed=43))
    assert (other != out[0]).mean() > 0.1
    torch.manual_seed(0)
    a = np_codes(qkern.quantize(x, "int4", rounding="stochastic"))
    torch.manual_seed(0)
    b = np_codes(qkern.quantize(x, "int4", rounding="stochastic"))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["int4", "nf4", "fp4_e2m1", "log2_4"])
def test_stochastic_is_unbiased(name):
    n = 200_000
    frac = 0.3
    scale = 0.5
    lo = {"int4": 1.0, "nf4": 0.16093020141124725, "fp4_e2m1": 1.0, "log2_4": 0.25}[name]
    hi = {"int4": 2.0, "nf4": 0.24611230194568634, "fp4_e2m1": 1.5, "log2_4": 0.5}[name]
    t = np.float32(lo + frac * (hi - lo))
    x = torch.full((n,), float(t) * scale)
    qt = qkern.quantize(x, name, granularity="tensor", scale=scale, rounding="stochastic",
                        seed=2024)
    deq = np_f32(qt.dequantize()) / scale
    assert set(np.unique(deq).tolist()) <= {np.float32(lo), np.float32(hi)}
    p = (deq == np.float32(hi)).mean()
    assert abs(p - frac) < 5 * np.sqrt(frac * (1 - frac) / n)
    assert abs(deq.mean() - t) < 5 * (hi - lo) * np.sqrt(frac * (1 - frac) / n)


# ------------------------------------------------------------------------- codebook formats
@pytest.mark.parametrize("name", CODEBOOK_FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_codebook_formats(name, rounding, rng):
    if name == "binary" and rounding in ("half_away", "trunc"):
        pytest.skip("binary: +1 and -1 have equal magnitude, the mode is not defined")
    x = _data(rng, (4, 256))
    kw = {"rounding": rounding, "seed": 77}
    run_codebook(x, name, **kw)
    run_codebook(x, name, granularity="channel", **kw)
    run_codebook(x, name, granularity="group", group_size=32, **kw)
    run_codebook(x, name, granularity="group", group_size=2, axis=0, **kw)


@pytest.mark.parametrize("name", [n for n in CODEBOOK_FORMATS if n not in ("mulaw", "alaw")])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_codebook_exact_values_and_midpoints(name, rounding):
    if name == "binary" and rounding in ("half_away", "trunc"):
        pytest.skip("not defined for binary")
    table = np.unique(R.format_values(name)[~np.isnan(R.format_values(name))])
    t64 = table.astype(np.float64)
    mids = ((t64[:-1] + t64[1:]) / 2).astype(np.float32)
    x = np.concatenate([table, mids, -mids, [0.0, -0.0], table * 1.5, [1e30, -1e30]])
    x = torch.from_numpy(x.astype(np.float32))
    run_codebook(x, name, granularity="tensor", scale=1.0, rounding=rounding, seed=1)


@pytest.mark.parametrize("name", CODEBOOK_FORMATS + ["mxfp4", "mxfp8_e4m3"])
def test_codebook_codes_are_unsigned(name, rng):
    qt = qkern.quantize(_data(rng, (2, 64)), name)
    assert qt.codes.dtype == torch.uint8


def test_binary_uses_mean_abs_scale(rng):
    x = _data(rng, (4, 64))
    qt = run_codebook(x, "binary", granularity="channel")
    np.testing.assert_allclose(np_f32(qt.scale), np.abs(np_f32(x)).mean(axis=1), rtol=1e-6)
    z = qkern.quantize(torch.tensor([0.0, -0.0, 1.0, -1.0]), "binary", scale=1.0)
    assert np_codes(z).tolist() == [0, 0, 0, 1]


# ------------------------------------------------------------------------------- MX formats
@pytest.mark.parametrize("name", MX_FORMATS)
def test_mx_formats(name, rng):
    x = rng.standard_normal((6, 128)).astype(np.float32)
    x *= 2.0 ** rng.integers(-30, 30, (6, 128 // 32)).repeat(32, axis=1)
    x[0, :32] = 0.0  # amax = 0 block: scale 2^-127
    x[1, :32] = 3.99  # amax just under a power of two
    x[1, 32:64] = 4.0
    x[2, :32] *= 1e-40  # subnormal amax: the exponent clamps at 2^-127
    x[2, 32:64] = 3e38 * np.sign(x[2, 32:64])  # the largest binades
    x = torch.from_numpy(x)
    if name == "mxint8":
        qt = run_int(x, name)
    else:
        qt = run_codebook(x, name)
    s = np_f32(qt.scale)
    assert s.shape == (6, 4)
    m, _ = np.frexp(s)
    assert (m == 0.5).all(), "MX scales are powers of two"
    assert s[0, 0] == np.float32(2.0**-127)


@pytest.mark.parametrize("name", MX_FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_mx_rounding(name, rounding, rng):
    if name == "mxint8" and rounding != "nearest_even":
        pytest.skip("mxint8 is defined with round-nearest-even")
    x = _data(rng, (3, 64))
    if name == "mxint8":
        run_int(x, name)
    else:
        run_codebook(x, name, rounding=rounding, seed=9)


# ---------------------------------------------------------------------------- double quant
@pytest.mark.parametrize("name", ["nf4", "fp4_e2m1"])
def test_double_quant(name, rng):
    x = _data(rng, (64, 640))  # 640 blocks: 256 + 256 + 128
    qt = qkern.quantize(x, name, double_quant=True)
    _, s, _ = R.quantize_codebook(np_f32(x), name)
    ds = R.double_quant_scales(s).reshape(s.shape)
    got_s = np_f32(qt.scale).reshape(s.shape)
    np.testing.assert_allclose(got_s, ds, rtol=0, atol=float(np.abs(s - s.mean()).max()) / 127)
    codes, _, deq = R.quantize_codebook(np_f32(x), name, scale=got_s)
    assert_codes_equal(np_codes(qt), codes, f"{name} double quant codes")
    assert_bits_equal(np_f32(qt.dequantize()), deq, f"{name} double quant dequant")
    plain = qkern.quantize(x, name)
    assert qt.bits_per_element < plain.bits_per_element


# ------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["int4", "uint8", "nf4", "fp8_e4m3", "mxfp4"])
def test_half_inputs_are_converted_to_float32(dtype, name, rng):
    x = _data(rng, (4, 128)).to(dtype)
    qt = qkern.quantize(x, name)
    x32 = x.float()
    if name.startswith(("int", "uint")):
        codes, _, _, deq = R.quantize_int(np_f32(x32), name)
    else:
        codes, _, deq = R.quantize_codebook(np_f32(x32), name)
    assert_codes_equal(np_codes(qt), codes, name)
    out = qt.dequantize()
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.float().numpy(), torch.from_numpy(deq).to(dtype).float())


@pytest.mark.parametrize("name", ["int4", "uint4", "nf4", "fp8_e5m2", "mxint8"])
def test_non_contiguous(name, rng):
    base = _data(rng, (128, 128))
    for x in (base.t(), base[::2, :], base[:, ::2].t(), base.unsqueeze(0).expand(2, 128, 128)):
        assert not x.is_contiguous()
        a = qkern.quantize(x, name)
        b = qkern.quantize(x.contiguous(), name)
        np.testing.assert_array_equal(np_codes(a), np_codes(b))
        np.testing.assert_array_equal(np_f32(a.scale), np_f32(b.scale))
        if name.startswith(("int", "uint")):
            assert_codes_equal(np_codes(a), R.quantize_int(np_f32(x.contiguous()), name)[0])


# ------------------------------------------------------------------------- size accounting
def test_bits_per_element(rng):
    x = _data(rng, (64, 256))
    qt = qkern.quantize(x, "int4", granularity="group", group_size=128)
    assert qt.bits_per_element == pytest.approx(4 + 32 / 128)
    assert qkern.quantize(x, "nf4").bits_per_element == pytest.approx(4 + 32 / 64)
    t8 = qkern.quantize(x, "int8")
    assert t8.bits_per_element == pytest.approx(8 + 32 / x.numel())
    assert qt.nbytes == x.numel() // 2 + 4 * (x.numel() // 128)
    packed = qt.pack()
    data = getattr(packed, "data", packed)
    assert data.numel() * data.element_size() == x.numel() // 2


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_away_rounding_is_directed_away_from_zero(isa):
    """The issue's definition: 1.2 -> 2, -1.2 -> -2; integers stay; ties are not special
    (a path the CPU lacks falls back to the next lower one)."""
    qkern.set_isa(isa)
    x = torch.tensor([1.2, -1.2, 2.0, -2.0, 0.5, -0.5, 0.0, 0.01, -0.01, 126.5, -127.9])
    got = qkern.quantize(x, "int8", scale=torch.tensor(1.0), rounding="away").codes
    assert got.tolist() == [2, -2, 2, -2, 1, -1, 0, 1, -1, 127, -128]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", isas.params())
def test_few_large_groups_match_reference(isa, threads):
    """Per-tensor and two-group scales of a tensor of many work chunks: statistics first, then
    the codes chunk by chunk from the end back (the end is what the cache still holds), on
    every ISA and thread count, against numpy (int8 / int4 affine, nf4 codebook)."""
    isas.use(isa)
    before = qkern.get_num_threads()
    qkern.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(6, 131_072 + 48, generator=g) * 0.1  # 786 720 values: a ragged end
        x[5, -1] = 3.0  # the last value sets the per-tensor scale
        for name in ("int8", "int4"):
            run_int(x, name, granularity="tensor")
            run_int(x.reshape(2, -1), name, granularity="channel")
        run_codebook(x, "nf4", granularity="tensor")
    finally:
        qkern.set_num_threads(before)
