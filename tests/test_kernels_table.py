"""The kernel table (qkern.kernels): a kernel class added from outside the package runs under
QuantLinear; int4 with any group that gemm_w4 takes (a multiple of 32 dividing K) runs the fused
kernel; a layer on the "dequant" path says why (kernel_reason) and warns once per reason."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkern
import qkern.nn.linear as linear_module
import qkern.ops.w4 as W
from qkern import kernels
from qkern.nn import KernelFallbackWarning, QuantLinear
from ref_groupwise import check_exact, check_fast

ISAS = ["scalar"] + (["avx2"] if qkern._C.cpu_has_avx2() else [])


class ExtInt5(kernels.Kernel):
    """A toy fused kernel for int5 weights in groups of 64: float weights, F.linear."""

    names = ("ext_int5",)
    order = 5

    def claims(self, q):
        return q.format.name == "int5"

    def reason(self, q, act, mode):
        if q.format.name != "int5":
            return "not int5"
        if q.group_size != 64:
            return f"test-only: group_size {q.group_size} is not 64"
        return None

    def pack(self, q, act, mode):
        return {"ext_w": q.dequantize().float().contiguous()}

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return F.linear(x2, bufs["ext_w"], bias)


@pytest.fixture
def ext_kernel():
    kernels.register(ExtInt5)
    try:
        yield ExtInt5
    finally:
        kernels.unregister(ExtInt5)


def test_kernel_class_added_from_outside(ext_kernel):
    torch.manual_seed(0)
    lin = nn.Linear(128, 12)
    ql = QuantLinear.from_float(lin, "int5", group_size=64)
    assert ql.kernel == "ext_int5" and ql.kernel_reason is None
    assert ql.buffer_names == ("ext_w",) and set(ql.packed_buffers()) == {"ext_w"}
    q = qkern.quantize(lin.weight.detach(), "int5", granularity="group", axis=1, group_size=64)
    w = q.dequantize().float()
    x = torch.randn(3, 5, 128)
    assert torch.equal(ql(x), F.linear(x, w, lin.bias))
    assert torch.equal(ql.dequantize_weight(), w)
    assert "ext_w" in ql.state_dict()
    with pytest.warns(KernelFallbackWarning, match="test-only: group_size 32 is not 64"):
        other = QuantLinear.from_float(lin, "int5", group_size=32)
    assert other.kernel == "dequant"
    assert other.kernel_reason == "ext_int5: test-only: group_size 32 is not 64"


def test_unregistered_kernel_is_gone(ext_kernel, monkeypatch):
    # the fallback warns once per reason per process: forget what earlier tests were warned of
    monkeypatch.setattr(linear_module, "_WARNED", set())
    kernels.unregister(ExtInt5)
    with pytest.warns(KernelFallbackWarning):
        ql = QuantLinear.from_float(nn.Linear(64, 4), "int5", group_size=64)
    assert ql.kernel == "dequant"
    assert ql.kernel_reason == "no fused kernel for format int5"
    kernels.register(ExtInt5)  # the fixture unregisters it again


def test_one_warning_per_reason_pointing_at_the_caller(ext_kernel):
    lin = nn.Linear(96, 4)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(3):
            QuantLinear.from_float(lin, "int5", group_size=96)  # one reason, three layers
        QuantLinear.from_float(lin, "int5", group_size=48)  # a second reason
        QuantLinear.from_float(lin, "int4", group_size=32)  # fused: no warning
    mine = [w for w in got if issubclass(w.category, KernelFallbackWarning)]
    assert [str(w.message).split(": ", 1)[1] for w in mine] == [
        "ext_int5: test-only: group_size 96 is not 64",
        "ext_int5: test-only: group_size 48 is not 64"]
    assert all(w.filename == __file__ for w in mine)


@pytest.mark.parametrize("fmt,kw,reason", [
    ("int4", dict(group_size=None), "w4_exact/w4_fast: needs groups along in_features"),
    ("int4", dict(group_size=32, quantizer="midrise"), "needs the midtread quantizer"),
    ("int2", dict(group_size=48), "group_size must be a positive multiple of 32, got 48"),
    ("uint8", dict(group_size=32), "no fused kernel for format uint8"),
    ("mulaw", dict(group_size=32), "no fused kernel for format mulaw"),
    ("int8", dict(group_size=32), "w8a16: needs one scale per output channel"),
])
def test_fallback_says_why(fmt, kw, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelFallbackWarning)
        ql = QuantLinear.from_float(nn.Linear(96, 4), fmt, **kw)
    assert ql.kernel == "dequant"
    assert reason in ql.kernel_reason


def test_table_order_and_names():
    names = [k.names[0] for k in kernels.table()]
    assert names[-1] == "dequant" and names.index("lut4_dq") < names.index("lut4")
    for k in kernels.table():
        for n in k.names:
            assert kernels.by_name(n) is k
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.by_name("nope")


@pytest.mark.parametrize("g", [256, 512])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_int4_large_groups_run_fused(g, mode):
    torch.manual_seed(1)
    lin = nn.Linear(1024, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        ql = QuantLinear.from_float(lin, "int4", group_size=g, symmetric=False, mode=mode)
    assert ql.kernel == f"w4_{mode}" and ql.kernel_reason is None
    q = qkern.quantize(lin.weight.detach(), "int4", granularity="group", axis=1, group_size=g,
                       symmetric=False)
    assert torch.equal(ql.dequantize_weight(), q.dequantize().float())
    x = torch.randn(5, 1024)
    codes, scales, zeros = q.codes.to(torch.int8), q.scale.float(), q.zero_point.to(torch.int32)
    (check_exact if mode == "exact" else check_fast)(ql(x), x, codes, scales, zeros, g,
                                                      lin.bias.detach())


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("shape", [(1, 9, 512, 256), (17, 9, 768, 256), (5, 7, 1024, 512),
                                   (33, 16, 1536, 768), (6, 8, 96, 96)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gemm_w4_any_multiple_of_32(shape, mode):
    """The op takes any group that is a multiple of 32 dividing K, on every path, with the
    same bits (the kernel table relies on it)."""
    m, n, k, g = shape
    gen = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    s = torch.rand(n, k // g, generator=gen) * 0.05 + 0.01
    z = torch.randint(-8, 8, (n, k // g), dtype=torch.int32, generator=gen)
    x, b = torch.randn(m, k, generator=gen) * 3, torch.randn(n, generator=gen)
    w = W.pack_weight(q, s, z, g)
    outs = []
    for isa in ISAS:
        for t in (1, 2):
            qkern.set_isa(isa)
            qkern.set_num_threads(t)
            outs.append(W.gemm_w4(x, w, b, mode))
    (check_exact if mode == "exact" else check_fast)(outs[0], x, q, s, z, g, b)
    for o in outs[1:]:
        assert torch.equal(o.view(torch.int32), outs[0].view(torch.int32))
    rows = torch.cat([W.gemm_w4(x[i:i + 1], w, b, mode) for i in range(m)])
    assert torch.equal(rows.view(torch.int32), outs[0].view(torch.int32))


def test_lut4_group_rule_is_the_ops():
    """QuantLinear takes nf4 with a group the op takes on every device (32 .. 512), and the CPU
    op refuses the groups its AVX2 paths cannot read safely."""
    from qkern.ops import lut4

    lin = nn.Linear(1024, 8)
    assert QuantLinear.from_float(lin, "nf4", group_size=256).kernel == "lut4"
    assert lut4.group_error(1024, 512) is None and lut4.group_error(1024, 16) is not None
    assert lut4.cpu_group_error(1536, 384) is not None  # 384 does not divide 512
    p = lut4.pack_weight(torch.zeros(4, 768, dtype=torch.uint8), torch.ones(4, 3), 256)
    with pytest.raises(ValueError, match="multiple of 16 dividing 512"):
        torch.ops.qkern.gemm_lut4(torch.ones(1, 768), p["packed"], torch.ones(4, 2),
                                  torch.zeros(16), None, 4, 768, 384)


def test_enums_come_from_C():
    """The enum values the ops take are exported by qkern._C; the Python names match them."""
    import importlib

    from qkern import formats
    from qkern.ops import checks

    Q = importlib.import_module("qkern.quantize")  # the module (qkern.quantize is a function)

    assert set(qkern._C.ROUNDINGS) == set(Q.ROUNDINGS)  # Q.ROUNDINGS: the names in id order
    assert [qkern._C.ROUNDINGS[n] for n in Q.ROUNDINGS] == list(range(len(Q.ROUNDINGS)))
    assert tuple(qkern._C.QUANTIZERS) == Q.QUANTIZERS
    assert list(qkern._C.QUANTIZERS.values()) == list(range(len(Q.QUANTIZERS)))
    assert qkern._C.NUM_ROUNDINGS == len(Q.ROUNDINGS)
    rules = qkern._C.SCALE_RULES
    assert (formats.SCALE_ABSMAX, formats.SCALE_MINMAX, formats.SCALE_POW2_MX,
            formats.SCALE_MEANABS) == (rules["absmax"], rules["minmax"], rules["pow2_mx"],
                                       rules["meanabs"])
    assert checks.AFFINE_RULES == (0, 1, 2, 3)


def test_lut4_binding_refuses_unsafe_groups():
    """The binding itself refuses groups the AVX2 paths cannot read safely."""
    for raw, args in ((qkern._C.gemm_lut4_raw, (0, 1, 0, 0, 0, 0, 4, 768, 384, 0)),
                      (qkern._C.gemm_lut4_dq_raw, (0, 1, 0, 0, 0, 0.0, 0, 0, 4, 768, 384, 1, 0))):
        with pytest.raises(ValueError, match="multiple of 16 dividing 512"):
            raw(*args)
