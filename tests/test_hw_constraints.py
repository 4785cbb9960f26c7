"""Hardware constraints (quantization/constraints.py) and qkern.hardware_cost, checked against
numpy references written from the definitions: sign-aligned worst-case inputs, brute force over
every input vector of tiny layers, round-half-even codes, power-of-two scales."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import qkern
import qkern.logdomain as L
import qkern.quantization as Q


def _layer(k, out, seed=0, scale=1.0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, out)
    with torch.no_grad():
        lin.weight.mul_(scale)
    return nn.Sequential(lin)


def _codes(q):
    qw = q[0].quantized_weight()
    assert qw.zero_point is None
    return qw.codes.numpy().astype(np.int64), qw.scale.numpy().reshape(-1).astype(np.float64)


def _in_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@pytest.mark.parametrize("acc,k,nbits,signed", [(12, 16, 4, True), (10, 8, 4, False),
                                                (16, 16, 8, True), (9, 12, 4, True)])
def test_accumulator_bound_holds_for_the_sign_aligned_worst_case(acc, k, nbits, signed):
    c = qkern.HardwareConstraints(accumulator_bits=acc, input_bits=nbits, input_signed=signed)
    m = _layer(k, 6, seed=acc, scale=4.0)
    q = qkern.quantize_model(m, qkern.WeightOnlyConfig(fmt="int8", group_size=None,
                                                       constraints=c))
    codes, _ = _codes(q)
    lo, hi = _in_range(nbits, signed)
    # the exact extremes of the dot product: x_i at hi / lo by the sign of w_i
    x_max = np.where(codes > 0, hi, lo)
    x_min = np.where(codes > 0, lo, hi)
    worst = np.maximum(np.abs((codes * x_max).sum(1)), np.abs((codes * x_min).sum(1)))
    assert worst.max() < 2 ** (acc - 1)
    # the budget is used (the layer was over it before): not a vacuous all-zero layer
    assert np.abs(codes).sum(1).max() > (2 ** (acc - 1) - 1) // max(-lo, hi) // 2
    rng = np.random.default_rng(0)
    xs = rng.integers(lo, hi + 1, size=(20000, k))
    assert np.abs(xs @ codes.T).max() <= worst.max()
    cost = qkern.hardware_cost(q, c)
    assert cost.rows[0]["worst_acc"] == worst.max()
    assert cost.rows[0]["acc_bits"] <= acc and cost.totals["all_fit"]


def test_accumulator_bound_brute_force_every_input_of_a_tiny_layer():
    c = qkern.HardwareConstraints(accumulator_bits=8, input_bits=3, input_signed=True)
    q = qkern.quantize_model(_layer(6, 3, seed=5, scale=3.0),
                             qkern.WeightOnlyConfig(fmt="int8", group_size=None, constraints=c))
    codes, _ = _codes(q)
    xs = np.array(list(itertools.product(range(-4, 4), repeat=6)), dtype=np.int64)
    assert xs.shape == (262144, 6)
    acc = xs @ codes.T
    assert np.abs(acc).max() < 2**7
    assert np.abs(codes).sum(1).max() <= 127 // 4
    # hardware_cost's worst case is the brute-force maximum, and its width the bits it needs
    row = qkern.hardware_cost(q, c).rows[0]
    assert row["worst_acc"] == np.abs(acc).max()
    m = int(np.abs(acc).max())
    assert row["acc_bits"] == next(b for b in range(1, 64) if m <= 2 ** (b - 1) - 1)


def test_within_budget_codes_are_plain_round_to_nearest_and_over_budget_a_soft_threshold():
    w = torch.tensor([[0.9, -0.5, 0.26, 0.1], [1.0, 1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    c = qkern.HardwareConstraints(accumulator_bits=12, input_bits=8,  # budget 2047 // 128 = 15
                                  accumulator_method="l1_project")
    _, scale, codes = Q.constraints.constrained_weight(w, "int4", c)
    s = w.abs().amax(1).numpy() / 7
    s[s == 0] = 1
    ref = np.clip(np.round(w.numpy() / s[:, None]), -8, 7).astype(np.int64)  # half to even
    np.testing.assert_allclose(scale.numpy(), s, rtol=1e-6)
    np.testing.assert_array_equal(codes[0].numpy(), ref[0])  # l1 = 7+4+2+1 = 14 <= 15
    # row 1: [7, 7, -7, 7] has l1 28 > 15: the smallest integer threshold t with l1 <= 15 is 4
    ts = [t for t in range(8) if np.maximum(np.abs(ref[1]) - t, 0).sum() <= 15]
    assert ts[0] == 4
    np.testing.assert_array_equal(codes[1].numpy(),
                                  np.sign(ref[1]) * np.maximum(np.abs(ref[1]) - 4, 0))
    np.testing.assert_array_equal(codes[2].numpy(), 0)


@pytest.mark.parametrize("pow2", [False, True])
def test_scale_method_coarsens_only_the_channels_over_budget(pow2):
    torch.manual_seed(4)
    w = torch.randn(6, 32)
    c = qkern.HardwareConstraints(accumulator_bits=12, input_bits=4, pow2_scales=pow2)
    budget = 2047 // 8
    _, scale, codes = Q.constraints.constrained_weight(w, "int8", c)
    s0 = w.abs().amax(1).double().numpy() / 127
    if pow2:
        s0 = 2.0 ** np.ceil(np.log2(s0))
    s, q = scale.double().numpy(), codes.numpy()
    assert (np.abs(q).sum(1) <= budget).all()
    r0 = np.clip(np.round(w.numpy() / s0[:, None]), -128, 127)
    over = np.abs(r0).sum(1) > budget
    assert over.all()  # int8 codes of 32 gaussian weights: l1 ~ 32 * 127 * 0.3 > 255
    assert (s > s0).all()
    # each channel is plain round-to-nearest at its (coarser) scale unless the soft threshold
    # had to finish the job; the scale stays within 2x of ||w||_1 / budget (4x with pow2)
    plain = np.clip(np.round(w.numpy() / s[:, None]), -128, 127)
    assert (plain == q).all(1).sum() >= 4
    need = np.abs(w.numpy()).sum(1) / budget
    assert (s <= 2 * need * (1 + 1e-5) * (2 if pow2 else 1)).all()


def test_pow2_scales_round_up_and_never_clip_more():
    m = _layer(32, 10, seed=3)
    c = qkern.HardwareConstraints(pow2_scales=True)
    q = qkern.quantize_model(m, qkern.WeightOnlyConfig(fmt="int4", group_size=None,
                                                       constraints=c))
    codes, scale = _codes(q)
    w = m[0].weight.detach().double().numpy()
    plain = np.abs(w).max(1) / 7
    e = np.log2(scale)
    np.testing.assert_array_equal(e, np.round(e))  # powers of two
    assert (scale >= plain).all() and (scale < 2 * plain).all()  # 2^ceil(log2 s)
    np.testing.assert_array_equal(codes, np.clip(np.round(w / scale[:, None]), -8, 7))
    assert (np.abs(w / scale[:, None]) <= 7).all()  # no value beyond the grid: nothing clipped


def test_per_tensor_and_symmetric_and_json_round_trip():
    c = qkern.HardwareConstraints(per_tensor=True, symmetric=True)
    cfg = qkern.WeightOnlyConfig(fmt="int8", symmetric=False, group_size=None, constraints=c)
    back = Q.BaseConfig.from_json(cfg.to_json())
    assert back == cfg and back.constraints == c
    m = _layer(16, 5, seed=1)
    with pytest.warns(UserWarning, match="symmetric weights"):
        q = qkern.quantize_model(m, cfg)
    codes, scale = _codes(q)
    assert np.unique(scale).size == 1
    np.testing.assert_allclose(scale[0], np.abs(m[0].weight.detach().numpy()).max() / 127,
                               rtol=1e-6)


def test_every_config_accepts_constraints_through_json():
    c = {"pow2_scales": True, "accumulator_bits": 24, "input_bits": 8}
    built = 0
    for name, cls in Q.registered_configs().items():
        try:
            cfg = cls(constraints=c)
        except TypeError:  # a config with required fields of its own
            continue
        built += 1
        assert isinstance(cfg.constraints, qkern.HardwareConstraints), name
        back = Q.BaseConfig.from_json(cfg.to_json())
        # JSON-level equality: QATConfig's inq_schedule tuple comes back as a list
        assert back.constraints == cfg.constraints and back.to_json() == cfg.to_json(), name
    assert built >= 10


def test_static_activations_get_pow2_symmetric_scales():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    c = qkern.HardwareConstraints(pow2_scales=True, symmetric=True, accumulator_bits=16)
    cfg = qkern.StaticConfig(fmt="int8", act_fmt="int8", act_symmetric=False, group_size=None,
                             constraints=c)
    q = qkern.quantize_model(m, cfg, calibration=[torch.randn(64, 8) * 3])
    for i in (0, 2):
        s = float(q[i].act_scale)
        assert s > 0 and np.log2(s) == np.round(np.log2(s))
        assert q[i].quantized_weight().zero_point is None
    assert qkern.hardware_cost(q, c).totals["all_fit"]


def test_impossible_and_unsupported_constraints_are_refused():
    with pytest.raises(ValueError, match="cannot hold even one product"):
        qkern.HardwareConstraints(accumulator_bits=8, input_bits=8)
    with pytest.raises(ValueError, match="accumulator_bits"):
        qkern.HardwareConstraints(accumulator_bits=1)
    with pytest.raises(ValueError, match="unknown field"):
        qkern.WeightOnlyConfig(constraints={"pow2": True})
    with pytest.raises(ValueError, match="does not apply hardware constraints"):
        Q.quantizer_for(qkern.AdaRoundConfig(
            constraints=qkern.HardwareConstraints(pow2_scales=True))).prepare(_layer(8, 4))
    # a layer the constraints cannot apply to stays float, named in the warning
    with pytest.warns(UserWarning, match="integer weight format"):
        q = qkern.quantize_model(_layer(64, 4), qkern.WeightOnlyConfig(
            fmt="fp8_e4m3", group_size=None, constraints={"accumulator_bits": 16}))
    assert type(q[0]) is nn.Linear


def test_hardware_cost_counts_groups_and_float_models():
    m = _layer(64, 4, seed=2)
    q = qkern.quantize_model(m, qkern.WeightOnlyConfig(fmt="int4", group_size=16))
    row = qkern.hardware_cost(q, None, input_bits=8).rows[0]
    assert row["weight_bits"] == 4 and row["act_bits"] == 32 and row["requant_steps"] == 4
    codes = q[0].quantized_weight().codes.numpy().astype(np.int64)
    worst = np.maximum(np.where(codes > 0, codes * 127, codes * -128).sum(1),
                       np.where(codes > 0, codes * 128, codes * -127).sum(1)).max()
    assert row["worst_acc"] == worst
    frow = qkern.hardware_cost(m, qkern.HardwareConstraints(accumulator_bits=16)).rows[0]
    assert frow["weight_bits"] == 8 and frow["fits"] is True


def test_activations_wider_than_the_bound_assumes_are_refused():
    c = qkern.HardwareConstraints(symmetric=True, accumulator_bits=12, input_bits=4)
    with pytest.raises(ValueError, match="int8 reach \\|x\\| = 128"):
        qkern.quantize_model(_layer(8, 4), qkern.StaticConfig(
            fmt="int8", act_fmt="int8", group_size=None, constraints=c),
            calibration=[torch.randn(4, 8)])
    with pytest.raises(ValueError, match="DynamicConfig"):
        qkern.quantize_model(_layer(8, 4), qkern.DynamicConfig(constraints=c))


def test_conv_layers_saved_and_loaded_keep_their_constrained_codes(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    c = qkern.HardwareConstraints(pow2_scales=True, symmetric=True, accumulator_bits=14,
                                  input_bits=8)
    cfg = qkern.StaticConfig(fmt="int8", act_fmt="int8", group_size=None, constraints=c)
    x = torch.randn(16, 2, 6, 6)
    q = qkern.quantize_model(m, cfg, calibration=[x])
    cost = qkern.hardware_cost(q, c)
    assert [r["K"] for r in cost.rows] == [18, 64] and cost.totals["all_fit"]
    for row, lin in zip(cost.rows, (q[0].qlinear, q[3])):
        codes = lin.quantized_weight().codes.numpy().astype(np.int64)
        worst = np.maximum(np.where(codes > 0, codes * 127, codes * -128).sum(1),
                           np.where(codes > 0, codes * 128, codes * -127).sum(1)).max()
        assert row["worst_acc"] == worst < 2**13
    qkern.save(q, tmp_path / "m.safetensors")
    back = qkern.load(tmp_path / "m.safetensors", m)
    assert torch.equal(back(x), q(x))
    assert back.qkern_config.constraints == c


def test_docstring_examples_run():
    import doctest

    for mod in (Q.constraints, Q.hardware, L):
        assert doctest.testmod(mod).failed == 0, mod.__name__
