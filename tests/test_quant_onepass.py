"""The one-pass dynamic symmetric quantizer (absmax scale, mid-tread, nearest-even, groups of a
multiple of 16: AVX-512 batches of up to 16 groups, an integer |x| maximum, NaN / Inf batches
redone by the general path) against the numpy reference, on every ISA, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import isas
import qkern
import reference as R
from _util import np_codes, np_f32
from qkern import _C
from qkern import formats as F
from qkern.ops.raw import ptr

COLS = 3 * 4096  # a multiple of every group size below


def _data(seed: int, rows: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, COLS)) * 0.02).astype(np.float32)
    flat = x.reshape(-1)
    flat[5::17] = np.round(flat[5::17] * 512) / 512  # exact ties at power-of-two scales
    x[1, :] = 0.0  # all-zero groups: scale 1
    x[2, :] = -0.0
    x[3, :] = np.float32(1e-41)  # subnormal amax: scale FLT_MIN
    x[4, :64] = np.float32(3e38)  # huge values beside ordinary ones
    x[5, 100] = np.float32(-7.5)  # one outlier
    return x


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("name", ["int2", "int3", "int4", "int8"])
def test_groups_match_reference(isa, name):
    isas.use(isa)
    x = _data(1, 7)
    xt = torch.from_numpy(x)
    for g in (16, 48, 64, 128, 256, 1024, 4096, COLS):
        kw = {"granularity": "group", "group_size": g}
        qt = qkern.quantize(xt, name, **kw)
        codes, scale, _, deq = R.quantize_int(x, name, **kw)
        what = f"{isa} {name} g={g}"
        np.testing.assert_array_equal(np_codes(qt), codes, err_msg=what)
        np.testing.assert_array_equal(np_f32(qt.scale).view(np.uint32),
                                      scale.astype(np.float32).view(np.uint32), err_msg=what)
        np.testing.assert_array_equal(np_f32(qt.dequantize()).view(np.uint32),
                                      deq.astype(np.float32).view(np.uint32), err_msg=what)


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("threads", [1, 2])
def test_channels_match_reference(isa, threads):
    isas.use(isa)
    qkern.set_num_threads(threads)
    x = _data(2, 45)  # 45 rows: batches of one row, 2 threads
    qt = qkern.quantize(torch.from_numpy(x), "int8", granularity="channel")
    codes, scale, _, _ = R.quantize_int(x, "int8", granularity="channel")
    np.testing.assert_array_equal(np_codes(qt), codes, err_msg=isa)
    np.testing.assert_array_equal(np_f32(qt.scale).reshape(-1), scale.reshape(-1), err_msg=isa)


def _raw(x: torch.Tensor, g: int, qmax: int):
    """The kernel on x (NaN / Inf allowed): (nonfinite flag, codes, scales)."""
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    scale = torch.empty(n // g)
    bad = _C.quantize_affine_dynamic_raw(ptr(x), n, g, -qmax - 1, qmax, F.SCALE_ABSMAX,
                                         float(qmax), 0, 0, 0, 0.0, 0, ptr(scale), 0, ptr(codes))
    return bad, codes.numpy().copy(), scale.numpy().view(np.uint32).copy()


@pytest.mark.parametrize("isa", isas.params(("avx2", "avx512")))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_batches_as_scalar(isa, bad):
    """A NaN / Inf in any group of a batch: flagged, and every code and scale (of that batch and
    the others) the scalar kernels' bits; the public call raises."""
    x = torch.from_numpy(_data(3, 6))
    for pos in (0, 129, 5 * 128 + 17, 16 * 128 + 3, x.numel() - 1):
        xb = x.clone().view(-1)
        xb[pos] = bad
        for g, qmax in ((128, 7), (64, 127), (COLS, 127)):
            qkern.set_isa("scalar")
            ref = _raw(xb, g, qmax)
            isas.use(isa)
            got = _raw(xb, g, qmax)
            assert ref[0] and got[0], (isa, pos, g)
            np.testing.assert_array_equal(got[1], ref[1], err_msg=f"{isa} {pos} {g} codes")
            np.testing.assert_array_equal(got[2], ref[2], err_msg=f"{isa} {pos} {g} scale")
        with pytest.raises(ValueError, match="NaN|Inf|finite"):
            qkern.quantize(xb.view(x.shape), "int4", granularity="group", group_size=128)


def _np_qpos(x: np.ndarray, g: int, qmin: int, qmax: int, qpos: float):
    """numpy from the spec: scale = sanitize(amax / qpos) per group, then the reference's
    codes (t = x * (1 / scale), nearest even, in [qmin, qmax]) as two's-complement bytes."""
    xg = x.reshape(-1, g)
    with np.errstate(over="ignore"):  # 3e38 / 0.75 is inf in float32, as in the kernel
        scale = R.sanitize_scale((np.abs(xg).max(axis=1) / np.float32(qpos)).astype(np.float32))
    codes = R.affine_quantize_2d(xg, scale[:, None], 0, qmin, qmax)
    return codes.reshape(-1).astype(np.uint8), scale.view(np.uint32)


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("qmin,qmax,qpos", [
    (-128, 127, 127.0), (-8, 7, 7.0), (-8, 7, 8.0),  # qpos = qmax; -qpos = qmin
    (-8, 7, 7.4), (-8, 7, 7.6), (-128, 127, 126.5), (-2, 1, 1.0), (-8, 7, 3.0),
    (-128, 127, 0.75), (-128, 127, 300.0)])
def test_qpos_clamps_where_rounding_leaves_the_range(isa, qmin, qmax, qpos):
    """The one-pass kernel skips its clamp only when an integral qpos lies inside the code range
    (rounding t, |t| <= qpos + a few ulp, cannot leave it); every other qpos (fractional, past
    qmax or -qmin, below 1) must still clamp: rows pushed to the edge of every group."""
    isas.use(isa)
    x = _data(4, 6).reshape(-1)
    x[::128] = np.float32(0.31)  # every 128-group holds the same +amax and -amax
    x[1::128] = np.float32(-0.31)
    for g in (128, 4096):
        xt = torch.from_numpy(x.copy())
        codes = torch.empty(x.size, dtype=torch.uint8)
        scale = torch.empty(x.size // g)
        _C.quantize_affine_dynamic_raw(ptr(xt), x.size, g, qmin, qmax, F.SCALE_ABSMAX, qpos,
                                       0, 0, 0, 0.0, 0, ptr(scale), 0, ptr(codes))
        ref_codes, ref_scale = _np_qpos(x, g, qmin, qmax, qpos)
        what = f"{isa} q[{qmin}, {qmax}] qpos={qpos} g={g}"
        np.testing.assert_array_equal(scale.numpy().view(np.uint32), ref_scale, err_msg=what)
        np.testing.assert_array_equal(codes.numpy(), ref_codes, err_msg=what)
