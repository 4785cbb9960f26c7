"""Format tables against published numbers, torch's float8 dtypes and audioop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
)

EXPECTED_NAMES = set(INT_FORMATS + CODEBOOK_FORMATS + MX_FORMATS + ["ternary"])
TABLE_FORMATS = [f for f in CODEBOOK_FORMATS + ["mxfp4", "mxfp8_e4m3"]]
TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def test_names_complete():
    names = qkern.formats.names()
    assert EXPECTED_NAMES <= set(names), EXPECTED_NAMES - set(names)
    for n in names:
        assert qkern.formats.get(n).name == n


@pytest.mark.parametrize("name", INT_FORMATS)
def test_integer_ranges(name):
    f = qkern.formats.get(name)
    qmin, qmax = R.int_range(name)
    bits = int(name.lstrip("uint"))
    assert (f.bits, f.qmin, f.qmax) == (bits, qmin, qmax)
    assert f.signed == name.startswith("int")
    assert f.codebook is None
    assert f.block_size is None


def test_ternary_range():
    f = qkern.formats.get("ternary")
    if f.codebook is not None:
        assert sorted(np_f32(f.codebook).tolist()) == [-1.0, 0.0, 1.0]
    else:
        assert (f.qmin, f.qmax) == (-1, 1)


@pytest.mark.parametrize("name", ["nf4", "fp8_e4m3", "mulaw"])
def test_values_is_float32_tensor(name):
    """The documented API: .values is a float32 torch tensor like .codebook."""
    v = qkern.formats.get(name).values
    assert isinstance(v, torch.Tensor) and v.dtype == torch.float32, type(v)


@pytest.mark.parametrize("name", TABLE_FORMATS)
def test_codebook_values_match_published_table(name):
    f = qkern.formats.get(name)
    ref = R.format_values(name)
    assert f.bits == int(np.log2(len(ref)))
    vals = np_f32(f.values)
    assert vals.shape == ref.shape
    np.testing.assert_array_equal(vals, ref)  # NaN == NaN here; -0.0 == 0.0
    finite = ref[~np.isnan(ref)]
    distinct = np.unique(finite)  # merges -0.0 with 0.0
    assert f.codebook.dtype == torch.float32
    np.testing.assert_array_equal(np_f32(f.codebook), distinct)
    assert float(f.max_value) == float(finite.max()) == R.MAX_VALUE[name]


def test_nf4_is_bitsandbytes_table():
    vals = np_f32(qkern.formats.get("nf4").values)
    assert vals.tolist() == R.NF4.tolist()
    assert qkern.formats.get("nf4").block_size == 64


def test_fp4_tables():
    e2m1 = np_f32(qkern.formats.get("fp4_e2m1").values)
    assert e2m1[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert e2m1[8:].tolist() == [-0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    # bitsandbytes dDequantizeFP4Tree constants, written out independently of the /12 rule
    bnb = [0.0, 0.0052083333, 0.6666667, 1.0, 0.3333333, 0.5, 0.16666667, 0.25]
    got = np_f32(qkern.formats.get("fp4_bnb").values)
    np.testing.assert_allclose(got[:8], bnb, rtol=1e-6)
    np.testing.assert_allclose(got[8:], -np.array(bnb), rtol=1e-6)
    for n, bs in [("fp4_e2m1", 64), ("fp4_bnb", 64), ("mxfp4", 32), ("mxfp8_e4m3", 32),
                  ("mxint8", 32)]:
        assert qkern.formats.get(n).block_size == bs, n


@pytest.mark.parametrize("name", sorted(TORCH_FP8))
def test_fp8_all_codes_vs_torch(name):
    """All 256 codes decode like torch's float8 dtype (NaN/Inf codes are NaN in .values)."""
    ref = torch.arange(256, dtype=torch.uint8).view(TORCH_FP8[name]).float().numpy()
    ref = np.where(np.isinf(ref), np.nan, ref)
    vals = np_f32(qkern.formats.get(name).values)
    np.testing.assert_array_equal(vals, ref)
    fin = ~np.isnan(ref)
    np.testing.assert_array_equal(np.signbit(vals[fin]), np.signbit(ref[fin]))  # -0 at 0x80


@pytest.mark.parametrize("name", sorted(TORCH_FP8))
def test_fp8_quantize_matches_torch_cast(name, rng):
    dt = TORCH_FP8[name]
    mx = R.MAX_VALUE[name]
    x = np.concatenate([
        rng.uniform(-mx, mx, 20000), rng.standard_normal(20000),
        rng.standard_normal(20000) * 2.0 ** rng.integers(-24, 8, 20000),
        [0.0, -0.0, 1e-30, -1e-30, mx, -mx]])
    x = np.clip(x, -mx, mx).astype(np.float32)  # torch's cast does not saturate
    xt = torch.from_numpy(x)
    qt = qkern.quantize(xt, name, granularity="tensor", scale=1.0)
    want = xt.to(dt).view(torch.uint8).numpy()
    assert_codes_equal(np_codes(qt), want, name, x)
    assert_bits_equal(np_f32(qt.dequantize()), xt.to(dt).float().numpy(), f"{name} dequant")


@pytest.mark.parametrize("name", sorted(TORCH_FP8))
def test_fp8_ties_and_exact_values_match_torch(name):
    mags, _ = R.magnitude_table(name)
    m64 = mags.astype(np.float64)
    mids = ((m64[:-1] + m64[1:]) / 2).astype(np.float32)  # exact midpoints: IEEE ties
    x = np.concatenate([mids, -mids, mags, -mags,
                        np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(1e9))])
    x = x.astype(np.float32)
    xt = torch.from_numpy(x)
    qt = qkern.quantize(xt, name, granularity="tensor", scale=1.0)
    assert_codes_equal(np_codes(qt), xt.to(TORCH_FP8[name]).view(torch.uint8).numpy(), name, x)


@pytest.mark.parametrize("name,big,code", [("fp8_e4m3", 1e6, 0x7E), ("fp8_e5m2", 1e9, 0x7B),
                                           ("fp8_e4m3", 449.0, 0x7E), ("fp8_e4m3", 470.0, 0x7E),
                                           ("fp8_e5m2", 61440.0, 0x7B),
                                           ("fp4_e2m1", 100.0, 0x7), ("mxfp4", 7.9, 0x7)])
def test_saturation_beyond_max(name, big, code):
    x = torch.tensor([big, -big] * 16, dtype=torch.float32)
    qt = qkern.quantize(x, name, granularity="tensor", scale=1.0)
    sign = len(R.format_values(name)) // 2
    assert np_codes(qt).tolist() == [code, code | sign] * 16
    d = np_f32(qt.dequantize())
    assert np.isfinite(d).all() and d[0] == R.MAX_VALUE[name] and d[1] == -R.MAX_VALUE[name]


def test_fp8_never_produces_nan_codes(rng):
    x = torch.from_numpy((rng.standard_normal(4096) * 1e4).astype(np.float32))
    for name in TORCH_FP8:
        qt = qkern.quantize(x, name, granularity="tensor", scale=1.0)
        assert np.isfinite(R.format_values(name)[np_codes(qt)]).all()


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_g711_format_values_vs_audioop(law):
    f = qkern.formats.get(law)
    np.testing.assert_array_equal(np_f32(f.values), R.g711_values(law))
    assert f.max_value == {"mulaw": 32124, "alaw": 32256}[law]


@pytest.mark.parametrize("bits", range(2, 9))
def test_log2_tables(bits):
    f = qkern.formats.get(f"log2_{bits}")
    k = 2 ** (bits - 1) - 1
    vals = np_f32(f.values)
    assert vals[0] == 0 and vals[1] == 2.0 ** (1 - k) and vals[k] == 1.0
    assert vals[2 ** (bits - 1) + k] == -1.0
    assert f.max_value == 1.0


def test_binary_table():
    f = qkern.formats.get("binary")
    assert f.bits == 1 and np_f32(f.values).tolist() == [1.0, -1.0]


def test_e2m1_quantize_published_points():
    x = torch.tensor([0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -0.25, -5.0, -0.0])
    qt = qkern.quantize(x, "fp4_e2m1", granularity="tensor", scale=1.0)
    # ties go to the even code: 0.25 -> 0, 0.75 -> 1.0 (code 2), 2.5 -> 2 (code 4), 5 -> 4
    assert np_codes(qt).tolist() == [0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 8, 14, 8]
