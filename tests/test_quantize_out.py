"""``out=`` of qkern.quantize / QTensor.dequantize on every ISA: the preallocated tensors are
written in place with the bits of the allocating call and of the numpy reference; bad outputs
are refused with clear errors before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import isas
import qkern
import reference as R
from _util import assert_bits_equal, assert_codes_equal, np_codes, np_f32

CASES = [
    ("int4", {"granularity": "group", "group_size": 128}),
    ("int8", {}),
    ("int8", {"granularity": "channel"}),
    ("uint8", {"granularity": "channel", "symmetric": False}),
    ("uint4", {"granularity": "group", "group_size": 32, "symmetric": False}),
    ("int4", {"granularity": "channel", "axis": 1}),  # not kernel order: copied in
    ("int8", {"granularity": "tensor", "scale": 0.01}),
    ("int4", {"granularity": "group", "group_size": 64, "clip_ratio": 0.9}),
    ("nf4", {}),
    ("nf4", {"double_quant": True}),
    ("fp8_e4m3", {"granularity": "channel"}),
    ("mxfp4", {}),
    ("mulaw", {}),
]


def _x(shape=(24, 256), seed=0) -> torch.Tensor:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::29] *= 15
    return torch.from_numpy(x)


def _ref_codes(x, name, kw):
    kw = {k: v for k, v in kw.items() if k != "double_quant"}
    if name.startswith(("int", "uint")) and "clip_ratio" not in kw:
        return R.quantize_int(np_f32(x), name, **kw)[0]
    return None


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("name,kw", CASES, ids=lambda v: str(v))
def test_quantize_out_in_place(isa, name, kw):
    isas.use(isa)
    x = _x()
    want = qkern.quantize(x, name, **kw)
    out = qkern.quantize(_x(seed=1) * 3, name, **kw)  # other values, the same structure
    ptrs = [t.data_ptr() for t in (out.codes, out.scale, out.zero_point) if t is not None]
    got = qkern.quantize(x, name, **kw, out=out)
    assert got is out
    assert ptrs == [t.data_ptr() for t in (out.codes, out.scale, out.zero_point)
                    if t is not None]
    assert_codes_equal(np_codes(out), np_codes(want), f"{isa} {name} {kw}")
    assert_bits_equal(np_f32(out.scale), np_f32(want.scale), f"{isa} {name} {kw} scale")
    if want.zero_point is not None:
        np.testing.assert_array_equal(out.zero_point.numpy(), want.zero_point.numpy())
    ref = _ref_codes(x, name, kw)
    if ref is not None:
        assert_codes_equal(np_codes(out), ref, f"{isa} {name} {kw} vs reference")
    d = torch.full(tuple(x.shape), float("nan"))
    assert out.dequantize(out=d) is d
    assert_bits_equal(np_f32(d), np_f32(want.dequantize()), f"{isa} {name} dequantize out=")


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("threads", [1, 2])
def test_large_out_misaligned(isa, threads):
    """4M+ floats (streaming stores) into an output that starts 4 bytes past a line, and a
    dtype conversion (bf16 out is computed, then copied)."""
    isas.use(isa)
    qkern.set_num_threads(threads)
    x = _x((1025, 4096), 2)
    qt = qkern.quantize(x, "int4", granularity="group", group_size=128)
    _, _, _, deq = R.quantize_int(np_f32(x), "int4", granularity="group", group_size=128)
    buf = torch.empty(x.numel() + 16)
    out = buf[1:1 + x.numel()].view(x.shape)
    assert qt.dequantize(out=out) is out
    assert_bits_equal(np_f32(out), deq, f"{isa} misaligned out")
    ob = torch.empty(x.shape, dtype=torch.bfloat16)
    assert qt.dequantize(out=ob) is ob  # dtype defaults to out's
    np.testing.assert_array_equal(ob.float().numpy(), torch.from_numpy(deq).bfloat16().float())


def test_quantize_out_sets_metadata_and_empty():
    x = _x().bfloat16()
    out = qkern.quantize(_x(), "int4", granularity="group", group_size=128)
    qkern.quantize(x, "int4", granularity="group", group_size=128, out=out)
    assert out.dtype == torch.bfloat16 and out.dequantize().dtype == torch.bfloat16
    e = qkern.quantize(torch.empty(0, 128), "int4", granularity="group", group_size=128)
    assert qkern.quantize(torch.empty(0, 128), "int4", granularity="group", group_size=128,
                          out=e) is e


def _bad_quantize_outs():
    x = _x()
    q = qkern.quantize(x, "int4", granularity="group", group_size=128)
    asym = qkern.quantize(x, "uint4", granularity="group", group_size=128, symmetric=False)

    def edit(**kw):
        from dataclasses import replace
        return replace(q, **kw)

    return [
        (q.codes, TypeError, "must be a QTensor"),
        (qkern.quantize(x, "int8"), ValueError, "format int8"),
        (qkern.quantize(x, "int4", granularity="group", group_size=64), ValueError, "layout"),
        (edit(codes=q.codes.view(torch.uint8)), TypeError, "codes has dtype torch.uint8"),
        (edit(codes=q.codes[:, :128]), ValueError, "codes has shape"),
        (edit(codes=q.codes.t().contiguous().t()), ValueError, "codes must be contiguous"),
        (edit(scale=q.scale.double()), TypeError, "scale has dtype"),
        (edit(codes=q.codes.to("meta")), ValueError, "codes is on meta"),
        (edit(zero_point=asym.zero_point), ValueError, "has a zero_point"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_quantize_out_refused(case):
    out, err, msg = _bad_quantize_outs()[case]
    before = None if not isinstance(out, qkern.QTensor) else out.scale.clone()
    with pytest.raises(err, match=msg):
        qkern.quantize(_x(), "int4", granularity="group", group_size=128, out=out)
    if before is not None and out.scale.device.type == "cpu":
        np.testing.assert_array_equal(out.scale.numpy(), before.numpy())  # nothing written


def test_quantize_out_zero_point_needed():
    x = _x()
    sym = qkern.quantize(x, "uint4", granularity="group", group_size=128, symmetric=True)
    with pytest.raises(ValueError, match="no zero_point"):
        qkern.quantize(x, "uint4", granularity="group", group_size=128, symmetric=False, out=sym)


@pytest.mark.parametrize("bad,err,msg", [
    (torch.empty(24, 255), ValueError, "shape"),
    (torch.empty(256, 24).t(), ValueError, "contiguous"),
    (torch.empty(24, 256, dtype=torch.int32), TypeError, "floating-point"),
    (torch.empty(24, 256, device="meta"), ValueError, "meta"),
    (np.empty((24, 256), np.float32), TypeError, "must be a tensor"),
])
def test_dequantize_out_refused(bad, err, msg):
    q = qkern.quantize(_x(), "int4", granularity="group", group_size=128)
    with pytest.raises(err, match=msg):
        q.dequantize(out=bad)
    with pytest.raises(TypeError, match="dtype"):
        q.dequantize(torch.float64, out=torch.empty(24, 256))


def test_raw_out_ops_refuse_bad_outputs():
    ops = torch.ops.qkern
    x = _x().reshape(-1)
    s = torch.ones(x.numel() // 128)
    with pytest.raises(ValueError, match="out must have 6144 elements"):
        ops.quantize_affine_out(x, s, None, 128, -8, 7, 0, 0, 0.0, 0,
                                torch.empty(5, dtype=torch.uint8))
    with pytest.raises(TypeError, match="out must be uint8, int8"):
        ops.quantize_affine_out(x, s, None, 128, -8, 7, 0, 0, 0.0, 0, torch.empty(6144))
    with pytest.raises(ValueError, match="contiguous"):
        ops.dequantize_affine_out(torch.zeros(6144, dtype=torch.uint8), s, None, 128, True, 0.0,
                                  torch.empty(12288)[::2])
