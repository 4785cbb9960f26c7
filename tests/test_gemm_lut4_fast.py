"""qkern::gemm_lut4_fast (the 4-bit codebook fast mode on gemm_w4's fast kernels) against a numpy
reference written from docs/numerics.md ("4-bit codebook fast mode"): the table rounded to int8
(t8 = rint(table / tmax * 127)), scales times float32(tmax / 127), x quantized per block of 32
as int4's fast mode does (ref_groupwise.quantize_x_ref), exact integer block dot products,
float32 FMA chains per group and over the groups; bit for bit on every ISA and 1 / 3 threads.
QuantLinear(mode="fast") on nf4 / fp4 and on a real layer of the shipped bytelm, within the
documented error bound of the exact nf4 layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import isas
import qkern
from qkern.nn import QuantLinear
from qkern.ops import NonFiniteError
from qkern.ops import lut4_fast as L
from ref_groupwise import U, quantize_x_ref

OPS = torch.ops.qkern
F32 = np.float32
F64 = np.float64


def fma32(a, b, c):
    """float32 fma(a, b, c): the exact a * b (float32 x float32 fits float64) plus c, rounded
    once to float64 and then to float32 (a double rounding only at an exact float32 tie)."""
    return (np.asarray(a, F64) * np.asarray(b, F64) + np.asarray(c, F64)).astype(F32)


def ref_table8(table) -> tuple[np.ndarray, np.float32]:
    t = np.asarray(table, F64)[:16]
    tmax = np.abs(t).max()
    return np.rint(t / tmax * 127.0).astype(np.int64), F32(tmax / 127.0)


def reference(x, codes, scales, table, group, bias=None) -> np.ndarray:
    t8, c = ref_table8(table)
    s = (scales.numpy().astype(F32) * c).astype(F32)  # (N, K // G), one float32 product
    xq, d = quantize_x_ref(x)
    m, k = x.shape
    n, nb, bpg = codes.shape[0], k // 32, group // 32
    du = np.einsum("mbj,nbj->mnb", xq.numpy().astype(np.int64).reshape(m, nb, 32),
                   t8[codes.numpy().astype(np.int64)].reshape(n, nb, 32))  # exact integers
    d = d.numpy()
    y = np.zeros((m, n), F32)
    for g in range(k // group):
        acc = np.zeros((m, n), F32)
        for b in range(g * bpg, (g + 1) * bpg):
            acc = fma32(d[:, b:b + 1], du[:, :, b], acc)
        y = fma32(s[None, :, g], acc, y)
    return y if bias is None else (y + bias.numpy().astype(F32)).astype(F32)


def lut(fmt: str) -> torch.Tensor:
    return torch.from_numpy(qkern.formats.get(fmt).lut[:16].copy())


def data(m, n, k, table, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    scales = torch.rand(n, k // 32, generator=g) + 0.05  # sliced per group below
    x = torch.randn(m, k, generator=g) * torch.linspace(0.1, 3.0, k)
    return x, codes, scales, torch.randn(n, generator=g)


RANDOM_TABLE = torch.tensor([-2.5, -1.7, -1.1, -0.8, -0.4, -0.2, -0.05, 0.0, 0.03, 0.3, 0.45,
                             0.9, 1.2, 1.9, 2.2, 3.1])
# (M, N, K, group, table): N not a multiple of 8, several groups, GEMV and GEMM row blocks
CASES = [(1, 13, 64, 32, "nf4"), (3, 40, 256, 64, "fp4_e2m1"), (9, 21, 384, 128, "fp4_bnb"),
         (1, 8, 512, 512, "nf4"), (17, 35, 128, 64, "random"), (2, 3, 96, 32, "nf4"),
         (40, 35, 320, 64, "nf4"), (67, 24, 192, 32, "random")]  # the amx tiles: 16-row blocks


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_reference_bit_for_bit_on_every_isa_and_thread_count(case):
    m, n, k, group, fmt = case
    table = RANDOM_TABLE if fmt == "random" else lut(fmt)
    x, codes, scales, bias = data(m, n, k, table)
    scales = scales[:, :k // group].contiguous()
    w = L.pack_weight(codes, scales, table, group)
    ref = reference(x, codes, scales, table, group, bias)
    for isa in isas.HAVE:
        for threads in (1, 3):
            qkern.set_isa(isa)
            qkern.set_num_threads(threads)
            y = L.gemm_lut4_fast(x, w, bias)
            np.testing.assert_array_equal(y.numpy(), ref, err_msg=f"{isa}, {threads} threads")
    assert len(isas.HAVE) >= 2  # at least one SIMD path compared with the scalar definition


@pytest.mark.parametrize("isa", isas.params())
def test_each_isa_large_and_leading_dims(isa):
    isas.use(isa)
    x, codes, scales, bias = data(6, 70, 1024, lut("nf4"), seed=3)
    scales = scales[:, :16].contiguous()
    w = L.pack_weight(codes, scales, lut("nf4"), 64)
    ref = reference(x, codes, scales, lut("nf4"), 64, None)
    y = L.gemm_lut4_fast(x.reshape(2, 3, -1), w)
    np.testing.assert_array_equal(y.reshape(6, -1).numpy(), ref)
    np.testing.assert_array_equal(L.gemm_lut4_fast(x[2:3], w).numpy(), ref[2:3])  # GEMV


def test_table8_and_pack_layout():
    t8, c = L.table8(lut("nf4"))
    ref8, rc = ref_table8(lut("nf4"))
    assert t8.dtype == torch.uint8 and np.array_equal(t8.numpy().astype(np.int64), ref8 + 128)
    assert np.float32(c) == rc
    assert ref8.min() == -127 and ref8.max() == 127  # nf4: tmax = 1 at both ends
    _, codes, scales, _ = data(1, 11, 64, None)
    w = L.pack_weight(codes, scales[:, :2], lut("nf4"), 32)
    back, s = L.unpack_weight(w, lut("nf4"))
    assert torch.equal(back, codes)
    torch.testing.assert_close(s, scales[:, :2], rtol=2e-7, atol=0)


def test_nonfinite_activations_raise():
    x, codes, scales, bias = data(3, 16, 64, None)
    w = L.pack_weight(codes, scales[:, :2], lut("nf4"), 32)
    for bad in (float("nan"), float("inf"), -float("inf")):
        xb = x.clone()
        xb[1, 40] = bad
        for isa in isas.HAVE:
            qkern.set_isa(isa)
            with pytest.raises(NonFiniteError, match="NaN or Inf"):
                L.gemm_lut4_fast(xb, w)


def test_bad_arguments():
    x, codes, scales, _ = data(2, 16, 64, None)
    w = L.pack_weight(codes, scales[:, :2], lut("nf4"), 32)
    with pytest.raises(ValueError, match="table8"):
        OPS.gemm_lut4_fast(x, w["packed"], w["scales"], torch.zeros(16, dtype=torch.uint8),
                           None, 16, 64, 32)
    with pytest.raises(ValueError, match="table8"):
        OPS.gemm_lut4_fast(x, w["packed"], w["scales"], w["table8"][:8], None, 16, 64, 32)
    with pytest.raises(ValueError, match="tile layout"):
        OPS.gemm_lut4_fast(x, w["packed"], scales[:, :2], w["table8"], None, 16, 64, 32)
    with pytest.raises(ValueError, match="all zeros"):
        L.pack_weight(codes, scales[:, :2], torch.zeros(16), 32)
    with pytest.raises(ValueError, match="0..15"):
        L.pack_weight(codes.to(torch.int16) + 1, scales[:, :2], lut("nf4"), 32)
    with pytest.raises(ValueError, match="group_size"):
        L.pack_weight(codes, scales[:, :2], lut("nf4"), 48)
    with pytest.raises(ValueError, match="mode 1"):
        qkern._C.gemm_w4_raw(x.data_ptr(), 2, w["packed"].data_ptr(), w["scales"].data_ptr(), 0,
                             0, 16, 64, 32, 0, torch.empty(2, 16).data_ptr(), 0,
                             w["table8"].data_ptr())


def _bound(x, w_exact, w_fast, s, tmax, group):
    """|y_fast - y_exact| elementwise: the activations' int8 rounding (d / 2 + 2.0001 u |x| per
    element) on the fast weight, the table's int8 rounding (s * tmax / 254, plus the float32
    rounding of s * tmax / 127 times 127) on |x|, and the float32 accumulation of both layers."""
    xq, d = quantize_x_ref(x)
    xd = xq * d.repeat_interleave(32, 1)
    xerr = d.repeat_interleave(32, 1) / 2 + 2.0001 * U * x.double().abs()
    werr = (s.double() * tmax * (1 / 254 + 2 * U)).repeat_interleave(group, 1)
    k = x.shape[1]
    acc = (k // 32 + k // group + group + 4) * 1.01 * U * (
        xd.abs() @ w_fast.double().abs().T + x.double().abs() @ w_exact.double().abs().T)
    return xerr @ w_fast.double().abs().T + x.double().abs() @ werr.T + acc


def test_quantlinear_bytelm_layer_within_bound():
    from qkern.models import load_llama
    from qkern.models.assets import shipped_path
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    lin = model.model.layers[1].mlp.gate_proj
    seen = []
    hook = lin.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        model(torch.tensor([list(b"The quick brown fox jumps over the lazy dog. " * 2)]))
    hook.remove()
    x = seen[0].reshape(-1, lin.in_features).float()
    exact = QuantLinear.from_float(lin, "nf4", group_size=64)
    fast = QuantLinear.from_float(lin, "nf4", group_size=64, mode="fast")
    assert (exact.kernel, fast.kernel) == ("lut4", "lut4_fast")
    with torch.no_grad():
        ye, yf = exact(x), fast(x)
    bound = _bound(x, exact.dequantize_weight(), fast.dequantize_weight(),
                   exact.quantized_weight().scale.reshape(lin.out_features, -1), 1.0, 64)
    err = (yf.double() - ye.double()).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    rel = float(err.norm() / ye.double().norm())
    assert 0 < rel <= float(bound.norm() / ye.double().norm()) and rel < 0.05


def test_quantlinear_selection_weight_and_compile():
    torch.manual_seed(0)
    lin = nn.Linear(128, 20)
    for fmt in ("nf4", "fp4_e2m1", "fp4_bnb"):
        q = QuantLinear.from_float(lin, fmt, group_size=32, mode="fast")
        assert q.kernel == "lut4_fast"
        qt = qkern.quantize(lin.weight.detach(), fmt, group_size=32)
        t8, c = ref_table8(qt.format.lut)
        s = (qt.scale.numpy().astype(F32) * c).astype(F32)
        w = t8[qt.codes.numpy().astype(np.int64)].astype(F32) * np.repeat(s, 32, axis=1)
        np.testing.assert_array_equal(q.dequantize_weight().numpy(), w)
        assert torch.equal(q.quantized_weight().codes, qt.codes)
        x = torch.randn(3, 128)
        ref = reference(x, qt.codes, qt.scale, torch.from_numpy(qt.format.lut), 32,
                        lin.bias.detach())
        np.testing.assert_array_equal(q(x).detach().numpy(), ref)
    dq = QuantLinear.from_float(lin, "nf4", group_size=32, mode="fast", double_quant=True)
    assert dq.kernel == "lut4_dq"
    assert QuantLinear.from_float(lin, "nf4", group_size=32).kernel == "lut4"
    q = QuantLinear.from_float(lin, "nf4", group_size=64, mode="fast")
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = q(x)
        assert torch.equal(torch.compile(q, fullgraph=True, backend="aot_eager")(x), y)
    with pytest.raises(NonFiniteError):
        q(torch.full((1, 128), float("nan")))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    lin = nn.Linear(96, 24)
    model = nn.Sequential(QuantLinear.from_float(lin, "fp4_e2m1", group_size=32, mode="fast"))
    qkern.save(model, tmp_path / "m.safetensors")
    back = qkern.load(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(96, 24)))
    assert back[0].kernel == "lut4_fast"
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
