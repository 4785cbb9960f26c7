"""Hypothesis fuzzing of the kernels through the Python API: clean errors or reference results."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import qkern
import reference as R
from _util import ALL_FORMATS, INT_FORMATS, np_codes, np_f32

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLEAN = (ValueError, TypeError)
SPECIAL = [np.nan, np.inf, -np.inf]
AFFINE = set(INT_FORMATS) | {"ternary", "mxint8"}

finite = st.floats(-1e6, 1e6, width=32) | st.sampled_from([0.0, -0.0, 1e-40, -3e-39, 0.5, 2.5])
maybe_bad = finite | st.sampled_from(SPECIAL)


@st.composite
def quant_case(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 12), min_size=ndim, max_size=ndim)))
    bad_x = draw(st.integers(0, 9)) == 0
    x = draw(arrays(np.float32, shape, elements=maybe_bad if bad_x else finite))
    kw = {
        "granularity": draw(st.sampled_from([None, "tensor", "channel", "group", "rows"])),
        "axis": draw(st.none() | st.integers(-4, 3)),
        "group_size": draw(st.none() | st.integers(-1, 8)),
        "rounding": draw(st.sampled_from(R.ROUNDINGS + ("up",))),
        "symmetric": draw(st.booleans()),
        "quantizer": draw(st.sampled_from(["midtread", "midtread", "midrise", "deadzone"])),
        "deadzone": draw(st.sampled_from([1.0, 1.5, 3.0, 0.5])),
        "seed": draw(st.integers(0, 2**64 - 1)),
    }
    return x, draw(st.sampled_from(ALL_FORMATS)), kw


def _expected(x: np.ndarray, name: str, kw: dict):
    """'error' if the spec rejects the call, 'either' where it leaves the call undefined,
    else the effective (granularity, axis, group_size)."""
    fmt = qkern.formats.get(name)
    gran, axis, g = kw["granularity"], kw["axis"], kw["group_size"]
    if gran == "rows" or kw["rounding"] == "up":
        return "error"
    if kw["quantizer"] != "midtread" and not kw["symmetric"]:
        return "error"
    if kw["quantizer"] == "deadzone" and kw["deadzone"] < 1:
        return "error"
    block = fmt.block_size
    gran = gran or ("group" if block else "tensor")
    nd = x.ndim
    if gran != "tensor":
        axis = (0 if gran == "channel" else -1) if axis is None else axis
        if not -nd <= axis < nd:
            return "error"
        axis %= nd
    if gran == "group":
        g = block if g is None else g
        if g is None or g <= 0 or x.shape[axis] % g:
            return "error"
    fmt_int = name in AFFINE
    either = (
        (not fmt_int and (kw["quantizer"] != "midtread" or not kw["symmetric"]))  # int notions
        or (name in ("ternary", "mxint8") and not kw["symmetric"])
        or (name == "int1" and kw["symmetric"] and kw["quantizer"] != "midrise")  # qmax = 0
        or (name == "mxint8" and kw["rounding"] != "nearest_even")
        or (name == "binary" and kw["rounding"] in ("half_away", "trunc"))  # |+1| == |-1|
    )
    if x.size and not np.isfinite(x).all():
        return "error" if either else "nonfinite"  # must fail; which message is open if either
    if either:
        return "either"
    return gran, axis, g


@FUZZ
@given(quant_case())
def test_quantize_fuzz(case):
    x, name, kw = case
    exp = _expected(x, name, kw)
    call = {k: v for k, v in kw.items()}
    try:
        qt = qkern.quantize(torch.from_numpy(x), name, **call)
    except CLEAN as e:
        assert exp in ("error", "nonfinite", "either"), f"{name} {kw} {x.shape}: {e}"
        if exp == "nonfinite":
            n_bad = int((~np.isfinite(x)).sum())
            assert f"{n_bad} NaN/Inf" in str(e) and "first at" in str(e), str(e)
        return
    assert exp not in ("error", "nonfinite"), f"{name} {kw} {x.shape}: accepted"
    assert tuple(qt.codes.shape) == x.shape
    deq = np_f32(qt.dequantize())
    assert deq.shape == x.shape and np.isfinite(deq).all()
    if exp == "either" or x.size == 0:
        return
    gran, axis, g = exp
    rk = {"granularity": gran, "axis": axis, "group_size": g, "rounding": kw["rounding"],
              "seed": kw["seed"]}
    if name in AFFINE:
        codes, _, _, ref = R.quantize_int(x, name, symmetric=kw["symmetric"],
                                          quantizer=kw["quantizer"], deadzone=kw["deadzone"],
                                          **rk)
    else:
        codes, _, ref = R.quantize_codebook(x, name, **rk)
    np.testing.assert_array_equal(np_codes(qt), codes, err_msg=f"{name} {kw}")
    np.testing.assert_array_equal(deq, ref, err_msg=f"{name} {kw}")


scale_value = st.sampled_from([0.0, -1.0, np.nan, np.inf, 1e-45, 1e-38, 3e38, 0.01, 1.0, 7.5])


@FUZZ
@given(st.sampled_from(ALL_FORMATS), st.sampled_from(["tensor", "channel", "group"]),
       st.data())
def test_garbage_scales(name, gran, data):
    x = data.draw(arrays(np.float32, (4, 8), elements=st.floats(-100, 100, width=32)))
    want_shape = {"tensor": (), "channel": (4,), "group": (4, 2)}[gran]
    shape = data.draw(st.sampled_from([want_shape, (3,), (4, 3), (1,), (8, 4)]))
    if shape == ():
        scale = data.draw(scale_value)
    else:
        scale = torch.from_numpy(data.draw(arrays(np.float32, shape, elements=scale_value)))
    kw = {"granularity": gran, "group_size": 4 if gran == "group" else None, "scale": scale}
    sc = np.asarray(scale, dtype=np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        # the spec multiplies by 1/scale in float32: a scale whose reciprocal overflows is bad
        bad = not (np.isfinite(sc).all() and (sc > 0).all()
                   and np.isfinite(np.float32(1) / sc).all())
    exact_shape = shape == want_shape
    one = shape == (1,) and gran == "tensor"  # a 1-element scale for one group: either way
    try:
        qt = qkern.quantize(torch.from_numpy(x), name, **kw)
    except CLEAN as e:
        assert bad or not exact_shape or (name == "int1"), f"{name} {gran} {shape}: {e}"
        return
    assert (exact_shape or one) and not bad, f"{name} {gran} scale shape {shape} accepted"
    rk = {"granularity": gran, "group_size": kw["group_size"], "scale": np.asarray(scale)}
    if name in AFFINE:
        codes, _, _, ref = R.quantize_int(x, name, **rk)
    else:
        codes, _, ref = R.quantize_codebook(x, name, **rk)
    np.testing.assert_array_equal(np_codes(qt), codes)
    np.testing.assert_array_equal(np_f32(qt.dequantize()), ref)


@FUZZ
@given(st.integers(-2, 10), st.integers(0, 300), st.integers(0, 80), st.booleans(),
       st.sampled_from(["lsb", "msb", "mid"]))
def test_unpack_fuzz(bits, n, nbytes, as_numpy, order):
    packed = np.random.default_rng(n * 1000 + nbytes).integers(0, 256, nbytes).astype(np.uint8)
    arg = packed if as_numpy else torch.from_numpy(packed)
    try:
        out = qkern.unpack_bits(arg, bits, n, order=order)
    except CLEAN:
        assert not (1 <= bits <= 8) or nbytes * 8 < n * bits or order == "mid"
        return
    assert 1 <= bits <= 8 and nbytes * 8 >= n * bits and order != "mid"
    np.testing.assert_array_equal(np.asarray(out), R.unpack_bits(packed, bits, n, order))


@FUZZ
@given(st.integers(1, 8), st.lists(st.integers(1, 9), min_size=1, max_size=3), st.data())
def test_pack_int32_fuzz(bits, shape, data):
    codes = data.draw(arrays(np.uint8, tuple(shape), elements=st.integers(0, 2**bits - 1)))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    got = qkern.pack_int32(torch.from_numpy(codes), bits, dim)
    ref = R.pack_int32(codes, bits, dim)
    np.testing.assert_array_equal(got.numpy(), ref)
    fresh = torch.tensor(ref.tolist(), dtype=torch.int32).reshape(ref.shape)
    back = qkern.unpack_int32(fresh, bits, codes.shape[dim], dim)
    np.testing.assert_array_equal(np.asarray(back), codes)


OPS = torch.ops.qkern


@FUZZ
@given(st.integers(0, 70), st.integers(-3, 40), st.integers(0, 8), st.integers(-1, 8),
       st.integers(-2, 260), st.data())
def test_raw_ops_never_crash(n, group, n_scale, rounding, table_n, data):
    """Garbage arguments straight into the C++ kernels: an exception, never a crash."""
    x = torch.randn(n)
    scale = torch.rand(n_scale) + 0.1
    vals = torch.arange(max(table_n, 0), dtype=torch.float32)
    vcodes = torch.arange(max(table_n, 0)).to(torch.uint8)
    codes = torch.randint(0, 256, (n,), dtype=torch.uint8)
    calls = [
        lambda: OPS.quantize_affine(x, scale, None, group, -8, 7, rounding, 0, 0.0, 1),
        lambda: OPS.quantize_affine_dynamic(x, group, -8, 7, 0, 7.0, 0, rounding, 0, 0.0, 1),
        lambda: OPS.dequantize_affine(codes, scale, None, group, True, 0.0),
        lambda: OPS.quantize_codebook(x, scale, vals, vcodes, 0, group, rounding, 1),
        lambda: OPS.quantize_codebook_dynamic(x, vals, vcodes, 8, group, 0, 6.0, 0, rounding,
                                              1),
        lambda: OPS.dequantize_lut(codes, scale, torch.zeros(max(table_n, 0)), group),
        lambda: OPS.unpack_bits(codes, group % 12, n_scale * 40, bool(rounding % 2)),
    ]
    for call in calls:
        try:
            call()
        except (ValueError, TypeError, RuntimeError, IndexError):
            pass
