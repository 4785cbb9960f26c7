"""torch.library checks of every qkern:: op, raw-op numerics vs the reference, torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.library import opcheck

import qkern
import reference as R
from qkern.ops.schemas import SCHEMAS
from qkern.ops.vq import pack_codes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit inside opcheck
OPS = torch.ops.qkern
RND = {name: i for i, name in enumerate(R.ROUNDINGS)}  # enum order of numerics.md's table
SHAPE = {"midtread": 0, "midrise": 1, "deadzone": 2}
RULE_ABSMAX, RULE_MINMAX, RULE_MX, RULE_MEANABS = 0, 1, 2, 3


def _x(shape=(4, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _e2m1():
    mags, codes = R.magnitude_table("fp4_e2m1")
    return torch.from_numpy(mags), torch.from_numpy(codes.astype(np.uint8))


def _nf4():
    vals, codes = R.signed_table("nf4")
    return torch.from_numpy(vals), torch.from_numpy(codes.astype(np.uint8))


def _lut(name):
    lut = np.zeros(256, np.float32)
    v = R.format_values(name)
    lut[: len(v)] = np.nan_to_num(v)
    return torch.from_numpy(lut)


def _out_cases(x, xf, s16, zp16, codes, vals, vcodes, nvals, ncodes):
    """The ``*_out`` ops: the functional cases plus preallocated outputs (int8 and uint8
    codes, an empty zero point for the symmetric rules)."""
    u8, i8, f32, i32 = torch.uint8, torch.int8, torch.float32, torch.int32

    def z(n, dtype=u8):
        return torch.zeros(n, dtype=dtype)

    return {
        "quantize_affine_out": [
            (xf, s16, None, 16, -8, 7, 0, 0, 0.0, 0, z(256, i8)),
            (x, s16, zp16, 16, 0, 15, RND["stochastic"], 0, 0.0, 123, z(256)),
            (xf, s16, None, 16, -128, 127, RND["half_away"], 2, 0.25, 0, z(256))],
        "quantize_affine_dynamic_out": [
            (xf, 16, -8, 7, RULE_ABSMAX, 7.0, 0, 0, 0, 0.0, 0, z(256, i8), z(16, f32),
             z(0, i32)),
            (xf, 32, 0, 255, RULE_MINMAX, 255.0, 0, RND["ceil"], 0, 0.0, 0, z(256), z(8, f32),
             z(8, i32))],
        "dequantize_affine_out": [
            (codes, s16, None, 16, True, 0.0, z(256, f32)),
            (codes, s16, zp16, 16, False, 0.5, z(256, f32))],
        "quantize_codebook_out": [
            (xf, s16, vals, vcodes, 8, 16, 0, 0, z(256)),
            (xf, s16, nvals, ncodes, 0, 16, RND["stochastic"], 9, z(256))],
        "quantize_codebook_dynamic_out": [
            (xf, vals, vcodes, 8, 64, RULE_ABSMAX, 6.0, 0, 0, 0, z(256), z(4, f32)),
            (xf, nvals, ncodes, 0, 32, RULE_MX, 1.0, 2, RND["trunc"], 0, z(256), z(8, f32))],
        "dequantize_lut_out": [(codes, s16, _lut("nf4"), 16, z(256, f32))],
    }


def _cases():
    x = _x()
    xf = x.reshape(-1)
    s16 = torch.rand(16) + 0.1
    zp16 = torch.randint(0, 16, (16,), dtype=torch.int32)
    codes = torch.randint(0, 256, (256,), dtype=torch.uint8)
    vals, vcodes = _e2m1()
    nvals, ncodes = _nf4()
    pcm = torch.randint(-32768, 32768, (300,), dtype=torch.int16)
    vq_codes = torch.randint(0, 16, (40, 12), dtype=torch.uint8)
    return {
        "quantize_affine": [
            (xf, s16, None, 16, -8, 7, 0, 0, 0.0, 0),
            (x, s16, zp16, 16, 0, 15, RND["stochastic"], 0, 0.0, 123),
            (xf, s16, None, 16, -128, 127, RND["half_away"], 2, 0.25, 0),
            (xf, s16, None, 16, -8, 7, RND["floor"], 1, 0.0, -5)],
        "quantize_affine_dynamic": [
            (xf, 16, -8, 7, RULE_ABSMAX, 7.0, 0, 0, 0, 0.0, 0),
            (xf, 32, 0, 255, RULE_MINMAX, 255.0, 0, RND["ceil"], 0, 0.0, 0),
            (xf, 32, -128, 127, RULE_MX, 127.0, 6, 0, 0, 0.0, 0),
            (xf, 64, -8, 7, RULE_ABSMAX, 7.5, 0, RND["stochastic"], 1, 0.0, 77)],
        "dequantize_affine": [
            (codes, s16, None, 16, True, 0.0), (codes, s16, zp16, 16, False, 0.0),
            (codes, s16, None, 16, True, 0.5)],
        "quantize_codebook": [
            (xf, s16, vals, vcodes, 8, 16, 0, 0),
            (xf, s16, nvals, ncodes, 0, 16, RND["stochastic"], 9)],
        "quantize_codebook_dynamic": [
            (xf, vals, vcodes, 8, 64, RULE_ABSMAX, 6.0, 0, 0, 0),
            (xf, vals, vcodes, 8, 32, RULE_MX, 6.0, 2, RND["trunc"], 0),
            (xf, nvals, ncodes, 0, 64, RULE_ABSMAX, 1.0, 0, RND["half_up"], 0)],
        "dequantize_lut": [(codes, s16, _lut("fp8_e4m3"), 16), (codes, s16, _lut("nf4"), 16)],
        # 40 x 24 weight: 12 2-d vectors per row, 16-entry codebooks per 16 rows, a scale per
        # row (bytes and 4-bit words) or per 4 vectors; one codebook, no scales
        "dequantize_vq": [(pack_codes(vq_codes, nibbles=nib), _x((3, 16, 2), 7),
                           torch.rand(40, 1) + 0.5, 40, 24, 16) for nib in (False, True)]
        + [(pack_codes(vq_codes), _x((3, 16, 2), 7), torch.rand(40, 3) + 0.5, 40, 24, 16),
           (pack_codes(vq_codes), _x((1, 16, 2), 8), None, 40, 24, 40)],
        **_out_cases(x, xf, s16, zp16, codes, vals, vcodes, nvals, ncodes),
        "pack_bits": [(codes, b, msb) for b in (1, 3, 4, 8) for msb in (False, True)],
        "unpack_bits": [(codes, b, 256 * 8 // b, msb) for b in (1, 3, 4, 8)
                        for msb in (False, True)],
        "mulaw_encode": [(pcm,), (pcm.reshape(3, 100),)],
        "alaw_encode": [(pcm,)],
        "mulaw_decode": [(codes,), (codes.reshape(16, 16),)],
        "alaw_decode": [(codes,)],
        "fwht": [(_x((4, 64), 3),), (_x((2, 3, 8), 4).bfloat16(),)],
        "requantize": [
            (torch.randint(-2**20, 2**20, (5, 24), dtype=torch.int32),
             torch.randint(2**30, 2**31 - 1, (24,), dtype=torch.int32),
             torch.randint(-20, 2, (24,), dtype=torch.int32), -3, -3, 127, 8),
            (torch.randint(-2**20, 2**20, (2, 3, 7), dtype=torch.int32),
             torch.tensor([1518500250], dtype=torch.int32), torch.tensor([-9], dtype=torch.int32),
             0, -2**31, 2**31 - 1, 32)],
        "lsq_fake_quantize": [
            (x, torch.tensor(0.3), None, None, 8, 7, 0.05),
            (x, torch.rand(4) + 0.1, torch.randn(4) * 0.1, 0, 8, 7, 0.02),
            (x.clone().requires_grad_(), (torch.rand(64) + 0.1).requires_grad_(), None, 1, 0,
             15, 0.1),
            (x.bfloat16(), torch.rand(64) + 0.1, None, -1, 2, 1, 0.5)],
        "lsq_fake_quantize_backward": [
            (_x((4, 64), 5), x, torch.tensor(0.3), None, None, 8, 7, 0.05),
            (_x((4, 64), 6), x, torch.rand(4) + 0.1, torch.randn(4) * 0.1, 0, 8, 7, 0.02)],
    }


def test_every_schema_has_cases():
    assert set(SCHEMAS) == set(_cases())


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_opcheck(op):
    for args in _cases()[op]:
        opcheck(getattr(OPS, op).default, args)


@pytest.mark.parametrize("rounding", list(R.ROUNDINGS))
@pytest.mark.parametrize("quantizer", ["midtread", "midrise", "deadzone"])
def test_raw_affine_op_vs_reference(rounding, quantizer):
    x = _x((8, 96), 1).reshape(-1)
    scale = torch.rand(8 * 96 // 32) + 0.05
    h = 0.5 if quantizer == "deadzone" else 0.0
    codes = OPS.quantize_affine(x, scale, None, 32, -8, 7, RND[rounding], SHAPE[quantizer],
                                h, 31)
    ref = R.affine_quantize_2d(x.numpy()[None], np.repeat(scale.numpy(), 32)[None], 0, -8, 7,
                               rounding, quantizer, 1 + 2 * h, 31,
                               np.arange(x.numel(), dtype=np.uint64)[None])[0]
    np.testing.assert_array_equal(codes.view(torch.int8).numpy(), ref)
    deq = OPS.dequantize_affine(codes, scale, None, 32, True,
                                0.5 if quantizer == "midrise" else 0.0)
    want = R.affine_dequantize(ref, np.repeat(scale.numpy(), 32), 0, quantizer)
    np.testing.assert_array_equal(deq.numpy(), want)


def test_raw_codebook_dynamic_vs_reference():
    x = _x((4, 128), 2)
    vals, vcodes = _e2m1()
    codes, scale = OPS.quantize_codebook_dynamic(x.reshape(-1), vals, vcodes, 8, 32, RULE_MX,
                                                 6.0, 2, 0, 0)
    ref_codes, ref_scale, _ = R.quantize_codebook(x.numpy(), "mxfp4")
    np.testing.assert_array_equal(codes.numpy().reshape(4, 128), ref_codes)
    np.testing.assert_array_equal(scale.numpy().reshape(4, 4), ref_scale)


def test_raw_pack_ops_vs_reference():
    codes = torch.randint(0, 8, (1000,), dtype=torch.uint8)
    for msb, order in ((False, "lsb"), (True, "msb")):
        p = OPS.pack_bits(codes, 3, msb)
        np.testing.assert_array_equal(p.numpy(), R.pack_bits(codes.numpy(), 3, order))
        np.testing.assert_array_equal(OPS.unpack_bits(p, 3, 1000, msb).numpy(), codes.numpy())


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("name,kw", [("int4", {"granularity": "group", "group_size": 32}),
                                     ("nf4", {}), ("uint8", {"symmetric": False})])
def test_compile_fullgraph_quantize_dequantize(name, kw):
    def f(x):
        return qkern.quantize(x, name, **kw).dequantize()

    x = _x((8, 128), 3)
    cf = torch.compile(f, fullgraph=True, dynamic=False)
    np.testing.assert_array_equal(cf(x).numpy(), f(x).numpy())
    x2 = _x((8, 128), 4)
    np.testing.assert_array_equal(cf(x2).numpy(), f(x2).numpy())


def test_compile_fullgraph_raw_ops():
    vals, vcodes = _nf4()
    lut = _lut("nf4")

    def g(x):
        c, s, _ = OPS.quantize_affine_dynamic(x.reshape(-1), 32, -8, 7, RULE_ABSMAX, 7.0, 0, 0,
                                              0, 0.0, 0)
        a = OPS.dequantize_affine(c, s, None, 32, True, 0.0)
        c2, s2 = OPS.quantize_codebook_dynamic(x.reshape(-1), vals, vcodes, 0, 64, RULE_ABSMAX,
                                               1.0, 0, 0, 0)
        b = OPS.dequantize_lut(c2, s2, lut, 64)
        p = OPS.unpack_bits(OPS.pack_bits(c2, 4, True), 4, c2.numel(), True)
        return a.reshape(x.shape), b.reshape(x.shape), p

    x = _x((4, 128), 5)
    got, want = torch.compile(g, fullgraph=True)(x), g(x)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_compile_fullgraph_out_ops():
    """The ``*_out`` ops under torch.compile: the preallocated outputs are written in place."""
    def g(x, codes, scale, out):
        OPS.quantize_affine_dynamic_out(x, 32, -8, 7, RULE_ABSMAX, 7.0, 0, 0, 0, 0.0, 0, codes,
                                        scale, torch.empty(0, dtype=torch.int32))
        OPS.dequantize_affine_out(codes, scale, None, 32, True, 0.0, out)
        return out + 1

    x = _x((4, 128), 7).reshape(-1)
    bufs = [(torch.empty(512, dtype=torch.int8), torch.empty(16), torch.empty(512))
            for _ in range(2)]
    got = torch.compile(g, fullgraph=True)(x, *bufs[0])
    want = g(x, *bufs[1])
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    for a, b in zip(*bufs):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    c, s, _ = OPS.quantize_affine_dynamic(x, 32, -8, 7, RULE_ABSMAX, 7.0, 0, 0, 0, 0.0, 0)
    np.testing.assert_array_equal(bufs[0][0].view(torch.uint8).numpy(), c.numpy())
    np.testing.assert_array_equal(bufs[0][1].numpy(), s.numpy())


def test_compile_quantize_dequantize_out():
    def f(x, qt, out):
        qkern.quantize(x, "int4", granularity="group", group_size=32, out=qt)
        return qt.dequantize(out=out) * 2

    x = _x((8, 128), 8)
    qt = qkern.quantize(torch.zeros(8, 128), "int4", granularity="group", group_size=32)
    out = torch.empty(8, 128)
    got = torch.compile(f, fullgraph=True)(x, qt, out)
    want = qkern.quantize(x, "int4", granularity="group", group_size=32)
    np.testing.assert_array_equal(qt.codes.numpy(), want.codes.numpy())
    np.testing.assert_array_equal(out.numpy(), want.dequantize().numpy())
    np.testing.assert_array_equal(got.numpy(), 2 * want.dequantize().numpy())
