"""Hardware constraints (docs/hardware.md) in OmniQuant, ZeroQuant, SmoothQuant and the
rotations. Checked against references written from the definitions: power-of-two scales by
``frexp`` (mantissa exactly 0.5), numpy's ``2^ceil(log2(amax / qmax))`` grid of the weights
clamped to OmniQuant's learned clip, the symmetric ``amax / qmax`` grid with round half to
even, the exact worst case of the accumulator (sign-aligned inputs), and, for the methods that
train, the training loss against the deployed block's measured error (the training forward is
the deployed weight)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llm_models as LM
import qkern
from qkern.quantization import quantize_sequential, quantizer_for
from qkern.quantization.algorithms.zeroquant import zeroquant_weight
from qkern.quantization.blocks import find_blocks
from test_hardware_constraints_llm import POW2_SYM, _is_pow2, _qlinears, _rows, _worst
from test_omniquant import _block0_mse


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(cfg, cal=None):
    model, q = LM.build("llama"), quantizer_for(cfg)
    cal = LM.calibration(4, 16) if cal is None else cal
    return model, q, quantize_sequential(model, q, cal, progress=False), cal


def _check_bound(qmodel, c, min_l1):
    """Every layer's codes within the A2Q bound (worst case over the input range) and the
    bound active (not a vacuous all-zero layer)."""
    lo, hi = c.input_range()
    for name, m in _qlinears(qmodel):
        qw, s, codes = _rows(m)
        assert qw.zero_point is None, name
        assert _worst(codes.numpy(), lo, hi).max() < 2 ** (c.accumulator_bits - 1), name
        assert np.abs(codes.numpy()).sum(1).max() > min_l1, name
    assert qkern.hardware_cost(qmodel, c).totals["all_fit"]


# ---- OmniQuant -------------------------------------------------------------------------------


def test_omniquant_pow2_grid_of_the_learned_clip_and_training_sees_it():
    cfg = qkern.OmniQuantConfig(bits=4, group_size=32, sym=False, epochs=3, lr_lwc=0.05,
                                constraints=POW2_SYM)
    model, quantizer, q, cal = _run(cfg)
    layers = dict(_qlinears(q))
    assert len(layers) == 14
    moved = 0
    for name, m in layers.items():
        qw, s, codes = _rows(m)
        assert qw.zero_point is None and _is_pow2(s), name
        # reference: the float weight clamped to the learned clip (LET off), symmetric
        # 2^ceil(log2(amax / 7)) per group of 32, round half to even
        w = model.get_submodule(name).weight.detach().double().numpy()
        up, low = (t.double().numpy() for t in quantizer.clips[name])
        wg = w.reshape(w.shape[0], -1, 32)
        hi = np.maximum(up * wg.max(-1), 0.0)
        lo = np.minimum(low * wg.min(-1), 0.0)
        amax = np.maximum(hi, -lo)
        ref_s = 2.0 ** np.ceil(np.log2(amax / 7))
        clamped = np.clip(wg, -amax[..., None], amax[..., None])
        np.testing.assert_array_equal(s.numpy(), ref_s)
        np.testing.assert_array_equal(codes.numpy().reshape(wg.shape),
                                      np.round(clamped / ref_s[..., None]))
        moved += int((up < 0.98).any() or (low < 0.98).any())
    assert moved > 0  # the clip trained
    # the training loss after the last step is the deployed block's error: the forward of
    # training was the constrained (pow2) grid, not OmniQuant's own
    name = find_blocks(model)[0]
    hist = quantizer.history[f"{name}.0"]
    assert hist[-1] == pytest.approx(_block0_mse(model, q, cal), rel=1e-4)


def test_omniquant_per_tensor_and_accumulator_bound():
    cfg = qkern.OmniQuantConfig(bits=4, group_size=None, epochs=1,
                                constraints={"per_tensor": True, "pow2_scales": True})
    _, _, q, _ = _run(cfg, LM.calibration(2, 16))
    for name, m in _qlinears(q):
        s = m.quantized_weight().scale
        assert torch.unique(s).numel() == 1 and _is_pow2(s), name
    c = qkern.HardwareConstraints(accumulator_bits=14, input_bits=8, pow2_scales=True)
    _, _, q, _ = _run(qkern.OmniQuantConfig(bits=8, group_size=None, sym=True, epochs=1,
                                            constraints=c), LM.calibration(2, 16))
    _check_bound(q, c, 63 // 2)


# ---- ZeroQuant -------------------------------------------------------------------------------


def test_zeroquant_weight_is_the_symmetric_grid_with_a_straight_through_gradient():
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(6, 64, generator=gen) + 0.7).requires_grad_(True)
    c = qkern.HardwareConstraints(symmetric=True)
    wq = zeroquant_weight(w, 4, 32, False, c)  # sym=False, but the constraints are symmetric
    wn = w.detach().double().numpy().reshape(6, 2, 32)
    s = (np.abs(wn).max(-1) / 7).astype(np.float32).astype(np.float64)
    ref = np.round(wn / s[..., None]) * s[..., None]
    np.testing.assert_allclose(wq.detach().double().numpy().reshape(wn.shape), ref, rtol=1e-6)
    wq.sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.ones((6, 64), np.float32))


def test_zeroquant_lkd_within_the_accumulator_bound():
    c = qkern.HardwareConstraints(accumulator_bits=16, input_bits=8, symmetric=True)
    cfg = qkern.ZeroQuantConfig(bits=8, group_size=None, sym=False, lkd=True, lkd_steps=10,
                                lkd_lr=1e-4, constraints=c)
    model, quantizer, q, cal = _run(cfg, LM.calibration(2, 16))
    _check_bound(q, c, 255 // 2)
    assert len(quantizer.lkd_losses) == 2
    assert all(after < before for before, after in quantizer.lkd_losses.values())
    # the distilled loss (fake-quantized weights as trained) and the deployed block's error
    # agree: LKD trained on the constrained grid (activations per token in both)
    name = find_blocks(model)[0]
    after = quantizer.lkd_losses[f"{name}.0"][1]
    assert after == pytest.approx(_block0_mse(model, q, cal), rel=1e-4)


# ---- SmoothQuant -----------------------------------------------------------------------------


def test_smoothquant_static_pow2_weights_and_activations():
    cfg = qkern.SmoothQuantConfig(act="static_tensor", constraints=POW2_SYM)
    _, quantizer, q, _ = _run(cfg)
    layers = _qlinears(q)
    assert len(layers) == 14
    for name, m in layers:
        qw, s, _ = _rows(m)
        assert qw.zero_point is None and _is_pow2(s), name
        sx = float(m.act_scale)
        assert _is_pow2(torch.tensor([sx])), name
        # the calibrated max|x| / 127 rounded UP to a power of two (nothing more clips)
        ref = 2.0 ** np.ceil(np.log2(np.float32(quantizer.act_absmax[name] / 127.0)))
        assert sx == ref, name


def test_smoothquant_per_tensor_and_accumulator_bound():
    cfg = qkern.SmoothQuantConfig(act="dynamic_tensor", constraints={"per_tensor": True})
    _, _, q, _ = _run(cfg)
    for name, m in _qlinears(q):
        assert torch.unique(m.quantized_weight().scale).numel() == 1, name
    c = qkern.HardwareConstraints(accumulator_bits=16, input_bits=8, pow2_scales=True)
    _, _, q, _ = _run(qkern.SmoothQuantConfig(act="static_tensor", constraints=c))
    _check_bound(q, c, 255 // 2)
    for _, m in _qlinears(q):
        assert _is_pow2(m.act_scale)


# ---- rotations -------------------------------------------------------------------------------


def test_rotation_rtn_pow2_groups_per_tensor_and_bound():
    _, _, q, _ = _run(qkern.RotationConfig(bits=4, group_size=32, sym=False,
                                           constraints=POW2_SYM))
    layers = _qlinears(q)
    assert len(layers) == 14
    for name, m in layers:
        qw, s, codes = _rows(m)
        assert qw.zero_point is None and _is_pow2(s), name
        assert s.shape[1] == codes.shape[1] // 32, name
    _, _, q, _ = _run(qkern.RotationConfig(bits=4, group_size=None,
                                           constraints={"per_tensor": True}))
    assert all(torch.unique(m.quantized_weight().scale).numel() == 1 for _, m in _qlinears(q))
    c = qkern.HardwareConstraints(accumulator_bits=14, input_bits=8, pow2_scales=True)
    _, _, q, _ = _run(qkern.RotationConfig(bits=8, group_size=None, constraints=c))
    _check_bound(q, c, 63 // 2)


# ---- what is refused -------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,match", [
    (qkern.SmoothQuantConfig(act="dynamic_token", constraints={"pow2_scales": True}),
     "cannot be made powers of two"),
    (qkern.SmoothQuantConfig(act="O1", constraints={"per_tensor": True}),
     "per-tensor activation scales"),
    (qkern.ZeroQuantConfig(constraints={"pow2_scales": True}), "cannot be made powers of two"),
    (qkern.ZeroQuantConfig(group_size=32, constraints={"accumulator_bits": 20}),
     "set group_size=None"),
    (qkern.OmniQuantConfig(constraints={"per_tensor": True}), "set group_size=None"),
    (qkern.OmniQuantConfig(bits=8, group_size=None, sym=True, act_bits=8,
                           constraints={"pow2_scales": True}), "cannot be made powers of two"),
    (qkern.RotationConfig(act_bits=8, constraints={"pow2_scales": True}),
     "cannot be made powers of two"),
    (qkern.SmoothQuantConfig(act="static_tensor",
                             constraints={"accumulator_bits": 20, "input_bits": 4}),
     "activations in int8"),
], ids=["sq-dyn-pow2", "sq-token-per-tensor", "zq-pow2", "zq-group", "omni-group",
        "omni-a8-pow2", "rot-a8-pow2", "sq-input-bits"])
def test_what_cannot_be_honoured_is_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        qkern.quantize_model(LM.build("llama"), cfg, LM.calibration(2, 16))

