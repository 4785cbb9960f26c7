"""Small helpers shared by the tests: run qkern and the numpy reference side by side."""

from __future__ import annotations

import numpy as np
import torch

import qkern
import reference as R

INT_FORMATS = [f"int{b}" for b in range(1, 9)] + [f"uint{b}" for b in range(1, 9)]
CODEBOOK_FORMATS = ["nf4", "fp4_e2m1", "fp4_bnb", "fp8_e4m3", "fp8_e5m2", "binary", "mulaw",
                    "alaw"] + [f"log2_{b}" for b in range(2, 9)]
MX_FORMATS = ["mxfp4", "mxfp8_e4m3", "mxint8"]
ALL_FORMATS = INT_FORMATS + ["ternary"] + CODEBOOK_FORMATS + MX_FORMATS


def np_codes(qt) -> np.ndarray:
    return qt.codes.cpu().numpy().astype(np.int64)


def np_f32(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(np.float32)
    return t.detach().cpu().float().numpy()


def signed_codes(name: str) -> bool:
    return name.startswith("int") or name == "ternary" or name == "mxint8"


def assert_bits_equal(a, b, what: str = "") -> None:
    """Float arrays equal bit for bit (so -0.0 != 0.0 and NaN == NaN)."""
    a = np.ascontiguousarray(np.asarray(a, np.float32))
    b = np.ascontiguousarray(np.asarray(b, np.float32))
    assert a.shape == b.shape, (what, a.shape, b.shape)
    bad = a.view(np.uint32) != b.view(np.uint32)
    if bad.any():
        i = np.flatnonzero(bad.reshape(-1))[0]
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} differ, first at flat {i}: "
                             f"{a.reshape(-1)[i]!r} vs ref {b.reshape(-1)[i]!r}")


def assert_codes_equal(got, ref, what: str = "", x=None) -> None:
    got, ref = np.asarray(got, np.int64), np.asarray(ref, np.int64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    bad = got != ref
    if bad.any():
        i = np.flatnonzero(bad.reshape(-1))[0]
        extra = f" x={np.asarray(x).reshape(-1)[i]!r}" if x is not None else ""
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} codes differ, first at flat "
                             f"{i}: {got.reshape(-1)[i]} vs ref {ref.reshape(-1)[i]}{extra}")


def check_params(qt, scale_ref, zp_ref=None, what: str = "") -> None:
    s = np_f32(qt.scale)
    if np.ndim(scale_ref) == 0:
        assert s.size == 1, (what, s.shape)
        s = s.reshape(())
    assert_bits_equal(s, scale_ref, f"{what} scale")
    if zp_ref is not None:
        if qt.zero_point is None:
            assert not np.any(zp_ref), f"{what}: zero_point None but reference has {zp_ref}"
        else:
            assert qt.zero_point.dtype == torch.int32
            z = qt.zero_point.numpy().astype(np.int64)
            assert_codes_equal(z.reshape(np.shape(zp_ref)), zp_ref, f"{what} zero_point")


def run_int(x: torch.Tensor, name: str, **kw):
    """qkern vs reference for an integer/affine format; returns the QTensor."""
    qt = qkern.quantize(x, name, **kw)
    ref_kw = {k: v for k, v in kw.items() if v is not None}
    if "granularity" not in ref_kw:  # spec defaults: block formats group along the last axis
        ref_kw["granularity"] = "group" if name in R.BLOCK else "tensor"
        ref_kw.setdefault("group_size", R.BLOCK.get(name))
    codes, sc, zp, deq = R.quantize_int(np_f32(x), name, **ref_kw)
    what = f"{name} {kw}"
    assert qt.codes.dtype == (torch.int8 if signed_codes(name) else torch.uint8), what
    assert tuple(qt.codes.shape) == tuple(x.shape), what
    assert_codes_equal(np_codes(qt), codes, what, np_f32(x))
    check_params(qt, sc, zp if kw.get("symmetric", True) is False else None, what)
    assert_bits_equal(np_f32(qt.dequantize(torch.float32)), deq, f"{what} dequant")
    return qt


def run_codebook(x: torch.Tensor, name: str, **kw):
    qt = qkern.quantize(x, name, **kw)
    ref_kw = {k: v for k, v in kw.items() if v is not None}
    codes, sc, deq = R.quantize_codebook(np_f32(x), name, **ref_kw)
    what = f"{name} {kw}"
    assert tuple(qt.codes.shape) == tuple(x.shape), what
    assert_codes_equal(np_codes(qt) & 0xFF, codes, what, np_f32(x))
    check_params(qt, sc, None, what)
    assert_bits_equal(np_f32(qt.dequantize(torch.float32)), deq, f"{what} dequant")
    return qt
