"""Hardware constraints (docs/hardware.md) in the LLM weight quantizers: RTN, GPTQ, AWQ, HQQ
(OmniQuant, ZeroQuant, SmoothQuant, rotations: test_hardware_constraints_llm2.py).
Checked against numpy references written from the definitions: power-of-two scales by
``frexp`` (mantissa exactly 0.5), the per-group ``2^ceil(log2(amax / qmax))`` grid, a naive
float64 OBS loop (Frantar et al. 2022) on that grid with a running l1 budget, the exact
worst case of the accumulator (sign-aligned inputs, and every input vector of a tiny layer),
and GPTQ against RTN under the same constraints on the shipped byte LM with WikiText-2 text."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import llm_models as LM
import qkern
from qkern.models import load_llama
from qkern.models.assets import shipped_path
from qkern.quantization import text_calibration
from qkern.quantization.algorithms.gptq import gptq_quantize
from qkern.quantization.algorithms.vq import VQConfig

POW2_SYM = {"pow2_scales": True, "symmetric": True}


def _qlinears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, qkern.nn.QuantLinear)]


def _is_pow2(s: torch.Tensor) -> bool:
    mant, _ = torch.frexp(s.double())
    return bool((mant == 0.5).all())


def _quantize(cfg, model=None, cal=None):
    model = LM.build("llama") if model is None else model
    return model, qkern.quantize_model(model, cfg, LM.calibration(4, 16) if cal is None else cal)


def _rows(m):
    qw = m.quantized_weight()
    n = qw.codes.shape[0]
    return qw, qw.scale.reshape(n, -1).double(), qw.codes.to(torch.int64)


@pytest.mark.parametrize("make", [
    lambda c: qkern.RTNConfig(bits=4, group_size=32, sym=False, constraints=c),
    lambda c: qkern.GPTQConfig(bits=4, group_size=32, sym=False, constraints=c),
    lambda c: qkern.AWQConfig(bits=4, group_size=32, sym=False, n_grid=4, constraints=c),
], ids=["rtn", "gptq", "awq"])
def test_pow2_symmetric_scales_on_every_layer(make):
    model, q = _quantize(make(POW2_SYM))
    layers = _qlinears(q)
    assert len(layers) == 14  # 7 linears x 2 blocks
    for name, m in layers:
        qw, s, codes = _rows(m)
        assert qw.zero_point is None, name  # symmetric: no zero points
        assert _is_pow2(s), name
        assert s.shape[1] == codes.shape[1] // 32, name  # groups of 32 kept
        assert codes.min() >= -8 and codes.max() <= 7
        # the layer's weights are codes * scale, exactly
        w = m.dequantize_weight().double().reshape(codes.shape[0], -1, 32)
        np.testing.assert_array_equal(w.numpy(), (codes.reshape(w.shape).double()
                                                 * s[:, :, None]).numpy())


def test_rtn_grid_is_the_pow2_ceiling_of_amax_over_qmax():
    model, q = _quantize(qkern.RTNConfig(bits=4, group_size=32, constraints=POW2_SYM))
    for name, m in _qlinears(q):
        w = model.get_submodule(name).weight.detach().numpy().astype(np.float64)
        wg = w.reshape(w.shape[0], -1, 32)
        ref = 2.0 ** np.ceil(np.log2(np.abs(wg).max(-1) / 7))  # rounded up: nothing clips
        _, s, codes = _rows(m)
        np.testing.assert_array_equal(s.numpy(), ref)
        # round half to even (np.round) of w / s; |w / s| <= 7 so no clamp is needed
        assert (np.abs(wg / ref[..., None]) <= 7).all()
        np.testing.assert_array_equal(codes.numpy().reshape(wg.shape),
                                      np.round(wg / ref[..., None]))


def test_hqq_pow2_scales_keep_float_zero_points():
    _, q = _quantize(qkern.HQQConfig(bits=4, group_size=32, constraints={"pow2_scales": True}))
    for name, m in _qlinears(q):
        qw = m.quantized_weight()
        assert _is_pow2(qw.scale), name
        assert qw.zero_point is not None and qw.zero_point.is_floating_point()


@pytest.mark.parametrize("make", [
    lambda c: qkern.RTNConfig(bits=4, group_size=None, constraints=c),
    lambda c: qkern.GPTQConfig(bits=4, group_size=None, constraints=c),
    lambda c: qkern.AWQConfig(bits=4, group_size=None, sym=True, n_grid=4, constraints=c),
    lambda c: qkern.HQQConfig(bits=4, group_size=None, constraints=c),
], ids=["rtn", "gptq", "awq", "hqq"])
def test_per_tensor_is_one_power_of_two_scale_per_layer(make):
    _, q = _quantize(make({"per_tensor": True, "pow2_scales": True}))
    for name, m in _qlinears(q):
        s = m.quantized_weight().scale
        assert torch.unique(s).numel() == 1, name
        assert _is_pow2(s), name


def _naive_gptq_l1(w, gram, bits, budget, damp=0.01):
    """Column-by-column OBS (float64) on the per-channel grid s = 2^ceil(log2(amax / qmax))
    with each row's codes kept within an l1 budget: a code is clamped to what its row has
    left before its error is fed back."""
    w = w.double().numpy().copy()
    h = 2.0 * gram.double().numpy()
    n, k = w.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = 2.0 ** np.ceil(np.log2(np.abs(w).max(1) / qmax))
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    codes = np.zeros((n, k), np.int64)
    left = np.full(n, float(budget))
    for c in range(k):
        t = np.clip(np.round(w[:, c] / s), qmin, qmax)
        t = np.clip(t, -left, left)
        left -= np.abs(t)
        codes[:, c] = t
        err = (w[:, c] - t * s) / hinv[c, c]
        w[:, c + 1:] -= np.outer(err, hinv[c, c + 1:])
        hinv = hinv - np.outer(hinv[:, c], hinv[c, :]) / hinv[c, c]
    return codes, s


@pytest.mark.parametrize("acc,in_bits,bits", [(10, 4, 4), (12, 8, 4), (14, 8, 8)])
def test_gptq_column_loop_keeps_the_l1_budget_as_the_naive_obs(acc, in_bits, bits):
    gen = torch.Generator().manual_seed(acc)
    n, k = 6, 24
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.5, 2.0, k)
    x = torch.randn(96, k, generator=gen) @ torch.randn(k, k, generator=gen) * 0.3
    gram = (x.T @ x / x.shape[0]).double()
    c = qkern.HardwareConstraints(pow2_scales=True, accumulator_bits=acc, input_bits=in_bits,
                                  accumulator_method="l1_project")
    res = gptq_quantize(w, gram, bits=bits, group_size=None, block_size=5,
                        dtype=torch.float64, constraints=c)
    codes, s = _naive_gptq_l1(w, gram, bits, c.l1_budget())
    np.testing.assert_array_equal(res.scale.double().numpy(), s)
    np.testing.assert_array_equal(res.codes.numpy().astype(np.int64), codes)
    assert (np.abs(codes).sum(1) <= c.l1_budget()).all()
    assert (np.abs(codes).sum(1) > c.l1_budget() // 2).any()  # the bound was active


def _worst(codes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """max |sum_i q_i x_i| over lo <= x_i <= hi: x_i = hi / lo by the sign of q_i (or the
    opposite), written from the definition."""
    up = np.where(codes > 0, codes * hi, codes * lo).sum(1)
    down = np.where(codes > 0, codes * lo, codes * hi).sum(1)
    return np.maximum(np.abs(up), np.abs(down))


@pytest.mark.parametrize("make", [
    lambda c: qkern.RTNConfig(bits=8, group_size=None, constraints=c),
    lambda c: qkern.GPTQConfig(bits=8, group_size=None, constraints=c),
    lambda c: qkern.GPTQConfig(bits=4, group_size=None, act_order=True, constraints=c),
    lambda c: qkern.AWQConfig(bits=4, group_size=None, n_grid=4, constraints=c),
], ids=["rtn8", "gptq8", "gptq4-act", "awq4"])
def test_accumulator_bound_on_every_llm_layer(make):
    c = qkern.HardwareConstraints(accumulator_bits=14, input_bits=8, pow2_scales=True)
    _, q = _quantize(make(c))
    for name, m in _qlinears(q):
        qw, s, codes = _rows(m)
        assert qw.zero_point is None and _is_pow2(s)
        worst = _worst(codes.numpy(), -128, 127)
        assert worst.max() < 2 ** 13, name
        assert np.abs(codes.numpy()).sum(1).max() > 63 // 2  # not a vacuous all-zero layer
    assert qkern.hardware_cost(q, c).totals["all_fit"]


@pytest.mark.parametrize("method", ["scale", "l1_project"])
def test_gptq_accumulator_bound_every_input_of_a_tiny_layer(method):
    c = qkern.HardwareConstraints(accumulator_bits=8, input_bits=3, accumulator_method=method)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 6, generator=gen) * 3
    x = torch.randn(40, 6, generator=gen)
    res = gptq_quantize(w, (x.T @ x / 40).double(), bits=8, group_size=None, constraints=c)
    codes = res.codes.numpy().astype(np.int64)
    xs = np.array(list(itertools.product(range(-4, 4), repeat=6)), dtype=np.int64)
    assert xs.shape == (262144, 6)
    acc = xs @ codes.T
    assert np.abs(acc).max() < 2 ** 7
    assert np.abs(acc).max() == _worst(codes, -4, 3).max()
    assert np.abs(codes).sum(1).max() > 127 // 4 // 2


def _logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_gptq_beats_rtn_under_the_same_constraints_on_bytelm():
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    cal = text_calibration(shipped_path("data/wikitext-2/wiki.valid.tokens"), "bytes", 8, 128)
    ids = text_calibration(shipped_path("data/wikitext-2/wiki.test.tokens"), "bytes", 2, 128,
                           seed=4)
    with torch.no_grad():
        ref = [_logits(model, i) for i in ids]
    c = qkern.HardwareConstraints(pow2_scales=True, symmetric=True, accumulator_bits=16,
                                  input_bits=8)
    gq = qkern.quantize_model(model, qkern.GPTQConfig(bits=4, group_size=None, act_order=True,
                                                      constraints=c), cal)
    rtn = qkern.quantize_model(model, qkern.RTNConfig(bits=4, group_size=None, constraints=c),
                               cal)
    for q in (gq, rtn):
        assert qkern.hardware_cost(q, c).totals["all_fit"]
        assert all(_is_pow2(m.quantized_weight().scale) for _, m in _qlinears(q))

    def mse(q):
        with torch.no_grad():
            return sum(float(((_logits(q, i) - r) ** 2).mean()) for i, r in zip(ids, ref))

    # the first layer of block 0 sees the same inputs in both runs: a like-for-like error
    first = gq.qkern_report[0]
    assert first.name == rtn.qkern_report[0].name
    assert first.error < rtn.qkern_report[0].error
    assert sum(r.error for r in gq.qkern_report) < sum(r.error for r in rtn.qkern_report)
    assert mse(gq) < mse(rtn)


def test_methods_that_cannot_apply_constraints_refuse_them():
    model, cal = LM.build("llama"), LM.calibration(2, 16)
    c = qkern.HardwareConstraints(pow2_scales=True)
    # among the LLM methods only the codebook (VQ) ones refuse, with the codebook reason
    # (OmniQuant / ZeroQuant / SmoothQuant / rotations: tests/test_hardware_constraints_llm2.py)
    with pytest.raises(ValueError, match="does not apply hardware constraints.*codebook"):
        qkern.quantize_model(model, VQConfig(constraints=c), cal)
    with pytest.raises(ValueError, match="set group_size=None"):
        qkern.quantize_model(model, qkern.GPTQConfig(constraints={"per_tensor": True}), cal)
    with pytest.raises(ValueError, match="set group_size=None"):
        qkern.quantize_model(model, qkern.RTNConfig(constraints={"accumulator_bits": 16}))
    with pytest.raises(ValueError, match="group_size=None"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), group_size=32,
                      constraints={"accumulator_bits": 16})
    with pytest.raises(ValueError, match="HQQ optimises a float zero point"):
        qkern.quantize_model(model, qkern.HQQConfig(constraints={"symmetric": True}))
    with pytest.raises(ValueError, match="same constraints"):
        qkern.quantize_model(model, qkern.AWQConfig(
            constraints=c, then=qkern.GPTQConfig(sym=False)), cal)
