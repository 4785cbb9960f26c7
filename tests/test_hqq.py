"""HQQ (qkern.quantization.algorithms.hqq) against a float64 numpy implementation of the
paper's update equations written here (Badri & Shaji 2023: min-max init, W_e = shrink_lp(W -
W_r), z = mean(W_q - (W - W_e) / s), beta *= kappa, early stopping on the l_p error), the
l_p objective's descent, the RTN baseline, the QuantLinear it builds (exactly its weights, on
the fused w4 / w23 kernels) and its input checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import llm_models as LM
import qkern
from qkern.io import read_safetensors, write_safetensors
from qkern.nn import QuantLinear
from qkern.nn.linear import KernelFallbackWarning
from qkern.quantization import BaseConfig
from qkern.quantization.algorithms.hqq import HQQConfig, hqq_linear, hqq_quantize, shrink_lp


def ref_hqq(w: np.ndarray, bits: int, g: int, iters=20, p=0.7, beta=10.0, kappa=1.01,
            early_stop=True, round_zero=False):
    """The paper's algorithm in float64 numpy, one group per row of ``wg``."""
    wg = w.astype(np.float64).reshape(-1, g)
    qmax = 2.0**bits - 1
    lo, hi = wg.min(axis=1, keepdims=True), wg.max(axis=1, keepdims=True)
    s = (hi - lo) / qmax
    s[s < np.finfo(np.float32).tiny] = 1.0
    z = -lo / s
    if round_zero:
        z = np.round(z)
    objs, zs = [], []
    for it in range(iters + 1):
        wq = np.clip(np.round(wg / s + z), 0, qmax)  # np.round: half to even, like torch
        wr = (wq - z) * s
        objs.append(float(np.sum(np.abs(wg - wr) ** p)))
        zs.append(z)
        if early_stop and it > 0 and objs[-1] >= min(objs[:-1]):
            break
        if it == iters:
            break
        x = wg - wr
        with np.errstate(divide="ignore"):  # |0|^(p-1) = inf: the threshold swallows it
            we = np.sign(x) * np.maximum(np.abs(x) - np.abs(x) ** (p - 1) / beta, 0.0)
        z = np.mean(wq - (wg - we) / s, axis=1, keepdims=True)
        beta *= kappa
    best = int(np.argmin(objs))
    codes = np.clip(np.round(wg / s + zs[best]), 0, qmax)
    return codes.reshape(w.shape), s, zs[best], objs, best


def lp(a: torch.Tensor, b: torch.Tensor, p: float = 0.7) -> float:
    return float((a.double() - b.double()).abs().pow(p).sum())


@pytest.mark.parametrize("bits,g,early,rz", [(4, 64, True, False), (3, 32, True, False),
                                             (2, 64, False, False), (4, None, False, False),
                                             (4, 32, True, True)])
def test_matches_float64_reference(bits, g, early, rz):
    torch.manual_seed(bits)
    w = torch.randn(12, 128) * 0.05
    w[0, :32] += 0.3  # an outlier region
    r = hqq_quantize(w, bits, g, early_stop=early, round_zero=rz, dtype=torch.float64)
    codes, s, z, objs, best = ref_hqq(w.numpy(), bits, g or 128, early_stop=early,
                                      round_zero=rz)
    assert r.best == best and len(r.objective) == len(objs)
    np.testing.assert_allclose(r.objective, objs, rtol=1e-12)
    np.testing.assert_array_equal(r.codes.numpy(), codes)
    np.testing.assert_allclose(r.scale.numpy().reshape(-1), s.reshape(-1), rtol=1e-15)
    np.testing.assert_allclose(r.zero.numpy().reshape(-1), z.reshape(-1), rtol=1e-12,
                               atol=1e-12)
    # float32 arithmetic (the default) lands on the same solution up to rounding
    r32 = hqq_quantize(w, bits, g, early_stop=early, round_zero=rz)
    assert abs(r32.objective[r32.best] - objs[best]) <= 1e-4 * objs[best]


def test_shrink_lp_is_the_lp_proximal_step():
    """p = 1: shrink_lp is the exact proximal operator argmin_y beta/2 (y - x)^2 + |y| (grid
    search); p < 1: it is the paper's one-step approximation, which moves x towards the exact
    l_p proximal point (grid search) and lands closer to it than x, and keeps 0 at 0."""
    ys = np.linspace(-3, 3, 600001)
    beta = 10.0
    for p in (1.0, 0.7):
        for x in (0.9, -1.5, 2.0, 0.05):
            f = beta / 2 * (ys - x) ** 2 + np.abs(ys) ** p
            exact = ys[np.argmin(f)]
            y = float(shrink_lp(torch.tensor(x, dtype=torch.float64), beta, p))
            if p == 1.0:
                assert abs(y - exact) < 1e-4
            else:
                assert abs(y - exact) < abs(x - exact) and abs(y) <= abs(x)
    assert float(shrink_lp(torch.tensor(0.0), beta, 0.7)) == 0.0
    assert torch.equal(shrink_lp(torch.tensor([0.05, -0.05]), beta, 1.0), torch.zeros(2))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_objective_decreases_and_beats_rtn(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    full = hqq_quantize(w, bits, 64, early_stop=False)
    o = full.objective
    assert len(o) == 21 and o[-1] < o[0]
    if bits < 4:  # without early stopping the 4-bit error turns up after ~10 steps here
        assert all(b <= a * (1 + 1e-6) for a, b in zip(o, o[1:])), o
    assert full.objective[full.best] == min(o)
    stop = hqq_quantize(w, bits, 64)  # early stop: decreasing up to the returned iterate
    o = stop.objective
    assert all(b < a for a, b in zip(o[:stop.best + 1], o[1:stop.best + 1]))
    assert stop.best == len(o) - 1 or len(o) == stop.best + 2
    assert stop.objective[stop.best] == min(o)
    # the returned weights' l_p error is the recorded one, and below min-max RTN's
    assert lp(w, stop.dequantize()) == pytest.approx(stop.objective[stop.best], rel=1e-5)
    rtn = qkern.quantize(w, f"uint{bits}", granularity="group", axis=1, group_size=64,
                         symmetric=False).dequantize()
    assert lp(w, stop.dequantize()) < min(lp(w, rtn), o[0])


@pytest.mark.parametrize("bits,kernel", [(4, "w4_exact"), (3, "w23_exact"), (2, "w23_exact")])
def test_quantlinear_reproduces_hqq_weights(bits, kernel):
    torch.manual_seed(bits)
    lin = nn.Linear(96, 20)
    cfg = HQQConfig(bits=bits, group_size=32)
    ql = hqq_linear(lin, cfg)
    r = hqq_quantize(lin.weight.detach(), bits, 32, round_zero=bits == 4)  # config default
    assert ql.kernel == kernel and ql.kernel_reason is None
    w = r.dequantize()
    assert torch.equal(ql.dequantize_weight(), w)
    assert torch.equal(ql.weight_q.codes if ql.weight_q.codes is not None else r.codes, r.codes)
    x = torch.randn(7, 96)
    ref = x.double() @ w.double().T + lin.bias.detach().double()
    for isa in ["scalar"] + (["avx2"] if qkern._C.cpu_has_avx2() else []):
        qkern.set_isa(isa)
        torch.testing.assert_close(ql(x).double(), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ql(x[:1]).double(), ref[:1], rtol=0, atol=1e-5)
    qkern.set_isa("auto")
    fast = hqq_linear(lin, HQQConfig(bits=bits, group_size=32, mode="fast"))
    assert fast.kernel == kernel.replace("exact", "fast")
    torch.testing.assert_close(fast(x).double(), ref, rtol=0, atol=0.05)


def test_8bit_and_ragged_fall_back_with_exact_weights():
    lin = nn.Linear(48, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelFallbackWarning)
        ql = hqq_linear(lin, HQQConfig(bits=8, group_size=16))
    assert ql.kernel == "dequant" and "uint8" in ql.kernel_reason
    assert torch.equal(ql.dequantize_weight(),
                       hqq_quantize(lin.weight.detach(), 8, 16).dequantize())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pipeline_quantizes_every_block_linear_without_data(arch):
    model = LM.build(arch)
    q = qkern.quantize_model(model, HQQConfig(bits=4, group_size=32))
    lins = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(lins) == (14 if arch == "llama" else 8)  # 7 per llama block, 4 per gpt2 block
    name, ql = next(iter(lins.items()))
    w = model.get_submodule(name).weight.detach()
    w = w.T if arch == "gpt2" else w  # transformers' Conv1D stores (in, out)
    assert torch.equal(ql.dequantize_weight(), hqq_quantize(w, 4, 32, round_zero=True).dequantize())
    assert all(m.kernel == "w4_exact" for m in lins.values())
    ids = LM.calibration(1)[0]
    ref, got = LM.output(model, ids), LM.output(q, ids)
    assert float((got - ref).norm() / ref.norm()) < 0.1
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # input untouched
    cfg = BaseConfig.from_json(HQQConfig(bits=3, lp_norm=0.5).to_json())
    assert cfg == HQQConfig(bits=3, lp_norm=0.5)


def test_pipeline_refuses_what_no_kernel_runs():
    with pytest.raises(ValueError, match="no fused kernel"):
        qkern.quantize_model(LM.build("llama"), HQQConfig(bits=8, group_size=32))


def test_bad_input():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="2-D"):
        hqq_quantize(torch.randn(64), 4, 32)
    with pytest.raises(TypeError, match="floating-point"):
        hqq_quantize(torch.ones(8, 64, dtype=torch.int32), 4, 32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        hqq_quantize(torch.full((8, 64), float("nan")), 4, 32)
    with pytest.raises(ValueError, match="does not divide"):
        hqq_quantize(w, 4, 48)
    with pytest.raises(ValueError, match="bits"):
        hqq_quantize(w, 5, 32)
    with pytest.raises(ValueError, match="lp_norm"):
        hqq_quantize(w, 4, 32, lp_norm=2.0)
    with pytest.raises(ValueError, match="kappa"):
        hqq_quantize(w, 4, 32, kappa=0.5)
    with pytest.raises(ValueError, match="axis"):
        HQQConfig(axis=0)
    with pytest.raises(ValueError, match="bits"):
        HQQConfig(bits=5)
    with pytest.raises(ValueError, match="iters"):
        HQQConfig(iters=-1)
    with pytest.raises(ValueError, match="sym"):
        HQQConfig(sym=True)
    with pytest.raises(ValueError, match="round_zero"):
        HQQConfig(round_zero=1)
    with pytest.raises(TypeError, match="nn.Linear"):
        hqq_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="does not divide"):
        hqq_linear(nn.Linear(50, 4), HQQConfig(group_size=32))


def test_save_load_roundtrip(tmp_path):
    model = LM.build("llama")
    q = qkern.quantize_model(model, HQQConfig(bits=3, group_size=32))
    qkern.save(q, tmp_path / "m.safetensors")
    back = qkern.load(tmp_path / "m.safetensors", model)
    name = "model.layers.0.self_attn.q_proj"
    assert back.get_submodule(name).kernel == "w23_exact"
    assert torch.equal(back.get_submodule(name).dequantize_weight(),
                       q.get_submodule(name).dequantize_weight())
    ids = LM.calibration(1)[0]
    assert torch.equal(LM.output(back, ids), LM.output(q, ids))
    assert back.qkern_config == HQQConfig(bits=3, group_size=32)
    # a file whose float zero points are not finite is refused, naming the tensor
    tensors, meta = read_safetensors(tmp_path / "m.safetensors", with_metadata=True)
    key = name + ".w23_zeros"
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    write_safetensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(ValueError, match="w23_zeros.*finite"):
        qkern.load(tmp_path / "bad.safetensors", model)
