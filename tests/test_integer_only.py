"""IntegerOnlyConfig: the converted digits MLP / CNN run on integer tensors only (every op output
recorded by a TorchDispatchMode), the integer layers equal a reference built from their stored
integer parameters (numpy int64 / float64 convolution of small integers + the Python-int
gemmlowp requantization of tests/fixedpoint_ref.py), pooling against torch's float pooling of
the codes, accuracy within 1 point of qkern's float-scale static W8A8, layers mode, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fixedpoint_ref as R
import qkern
from qkern.nn import (
    IntegerAvgPool2d,
    IntegerConv2d,
    IntegerLinear,
    IntegerLinearIO,
    IntegerMaxPool2d,
    IntegerModel,
)
from qkern.quantization import BaseConfig, IntegerOnlyConfig, StaticConfig
from qkern.quantization.algorithms.integer_only import integer_layer, widen_to_int16

pytest.importorskip("sklearn")
from qkern.models import digits as D  # noqa: E402


class DtypeRecorder(TorchDispatchMode):
    """Records (op, dtype) of every tensor every dispatched op returns."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen += [(str(func), t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def floats(seen):
    return [(op, dt) for op, dt in seen if dt.is_floating_point or dt.is_complex]


@pytest.fixture(scope="module")
def digits():
    data = D.load_data()
    return data, {k: D.train(k, data) for k in ("mlp", "cnn")}


def _calib(data):
    return list(data.x_calib.split(64))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_digits_integer_only_no_float_and_accuracy(kind, digits):
    data, models = digits
    model = models[kind]
    q = qkern.quantize_model(model, IntegerOnlyConfig(), calibration=_calib(data))
    im = IntegerModel(q)
    codes_in = im.quantize(data.x_test)
    assert codes_in.dtype == torch.int8
    rec = DtypeRecorder()
    with torch.no_grad(), rec:
        out = im(codes_in)
    assert out.dtype == torch.int8 and out.shape == (len(data.y_test), 10)
    assert rec.seen and not floats(rec.seen), floats(rec.seen)[:5]
    assert any("qkern.requantize" in op for op, _ in rec.seen)
    # the recorder does see floats where there are some (the test can fail)
    rec2 = DtypeRecorder()
    with torch.no_grad(), rec2:
        model(data.x_test[:2])
    assert floats(rec2.seen)

    acc_int = float((im.dequantize(out).argmax(-1) == data.y_test).float().mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w8a8 = qkern.quantize_model(model, StaticConfig(), calibration=_calib(data))
    acc_w8a8 = D.accuracy(w8a8, data.x_test, data.y_test)
    acc_float = D.accuracy(model, data.x_test, data.y_test)
    assert acc_float > 0.9
    assert acc_int >= acc_w8a8 - 0.01, (acc_int, acc_w8a8, acc_float)


def _ref_requant(acc: np.ndarray, layer) -> list:
    m0, sh = layer.m0.tolist(), layer.shift.tolist()
    nm = len(m0)
    return [[R.requantize(int(a), m0[c % nm], sh[c % nm], layer.out_zp, layer.qmin, layer.qmax)
             for c, a in enumerate(row)] for row in acc.reshape(-1, acc.shape[-1])]


def test_integer_linear_vs_reference():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(24, 11)
    for act_sym, per_ch, relu_min in [(False, True, -128), (True, False, 0), (False, True, -7)]:
        s_in, zp = (0.03, 0) if act_sym else (0.02, 9)
        layer = integer_layer(lin, s_in, zp, 0.05, relu_min if relu_min > -128 else -20,
                              qmin=relu_min, per_channel=per_ch)
        x = torch.randint(-128, 128, (6, 24), generator=g, dtype=torch.int8)
        got = layer(x)
        acc = (x.numpy().astype(np.int64) - zp) @ layer.w_q.numpy().astype(np.int64).T
        acc = acc + layer.bias_q.numpy()
        assert got.tolist() == _ref_requant(acc, layer)
        # the integer parameters: w_q ~ w / s_w, bias_q = round(b / (s_in s_w)), m0 2^(sh-31) ~ M
        s_w = lin.weight.detach().double().abs().amax(1) / 127
        if not per_ch:
            s_w = s_w.max().expand(11)
        np.testing.assert_array_equal(layer.bias_q.numpy(),
                                      np.round(lin.bias.detach().double().numpy()
                                               / (s_in * s_w.numpy())))
        m = layer.m0.double() * 2.0 ** (layer.shift.double() - 31)
        np.testing.assert_allclose(m.numpy(), (s_in * s_w / 0.05).numpy(), rtol=1e-6)


def test_integer_linear_int16_out_vs_reference():
    """layers mode's int16 output codes: bit-exact against the Python-int gemmlowp / TFLite
    requantization with the int16 zero point and clamp (clamping exercised at both ends)."""
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(40, 13)
    s16, zp16 = widen_to_int16(0.05, -7)
    # the int16 grid covers exactly the int8 grid's real range, 257x finer
    assert zp16 == 257 * -7 + 128 and s16 * 257 == pytest.approx(0.05, rel=1e-15)
    assert (-32768 - zp16) * s16 == pytest.approx((-128 + 7) * 0.05, rel=1e-12)
    assert (32767 - zp16) * s16 == pytest.approx((127 + 7) * 0.05, rel=1e-12)
    for s_out, zp_out, per_ch in [(s16, zp16, True), (s16 / 40, 1000, False),
                                  (1e-5, 0, True)]:
        layer = integer_layer(lin, 0.02, 9, s_out, zp_out, qmin=-32768, per_channel=per_ch,
                              out_bits=16)
        x = torch.randint(-128, 128, (64, 40), generator=g, dtype=torch.int8)
        got = layer(x)
        assert got.dtype == torch.int16 and layer.qmax == 32767
        acc = (x.numpy().astype(np.int64) - 9) @ layer.w_q.numpy().astype(np.int64).T
        acc = acc + layer.bias_q.numpy()
        want = _ref_requant(acc, layer)
        assert got.tolist() == want
        # and the codes are round(acc * M) + zp: the real rescale to within the fixed-point error
        m = (layer.m0.double() * 2.0 ** (layer.shift.double() - 31)).numpy()
        ideal = np.clip(np.round(acc * m) + zp_out, -32768, 32767)
        assert np.abs(np.array(want) - ideal).max() <= 1
    assert (np.array(want) == 32767).any() and (np.array(want) == -32768).any()
    with pytest.raises(ValueError, match="Linear"):
        integer_layer(nn.Conv2d(2, 3, 3), 0.1, 0, 0.1, 0, out_bits=16)
    with pytest.raises(ValueError, match="out_bits"):
        IntegerLinear(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, dtype=torch.int32),
                      torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                      in_zp=0, out_zp=0, out_bits=4)
    with pytest.raises(ValueError, match="int8 value"):
        IntegerLinear(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, dtype=torch.int32),
                      torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                      in_zp=300, out_zp=0, qmax=32767, out_bits=16)


def test_integer_conv_and_pools_vs_reference():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=(1, 2), padding=(1, 2))
    layer = integer_layer(conv, 0.04, -11, 0.1, 3, qmin=3)
    assert isinstance(layer, IntegerConv2d)
    x = torch.randint(-128, 128, (2, 3, 7, 9), generator=g, dtype=torch.int8)
    got = layer(x)
    # reference: float64 convolution of the centred codes (small integers: exact), zero padding
    acc = F.conv2d(x.double() - (-11), layer.w_q.double(), stride=(1, 2), padding=(1, 2))
    acc = acc.round().to(torch.int64) + layer.bias_q.view(1, -1, 1, 1).long()
    acc_cl = acc.permute(0, 2, 3, 1).numpy()  # channels last, as _ref_requant reads them
    want = np.array(_ref_requant(acc_cl, layer)).reshape(acc_cl.shape).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got.numpy(), want)
    # pooling on codes: max commutes with the affine map; average rounds half away from zero
    y = torch.randint(-128, 128, (2, 4, 6, 8), generator=g, dtype=torch.int8)
    np.testing.assert_array_equal(IntegerMaxPool2d((2, 2), (2, 2))(y).numpy(),
                                  F.max_pool2d(y.double(), 2).numpy())
    avg = F.avg_pool2d(y.double(), (2, 3), (2, 1)).numpy() * 6
    want = np.sign(avg) * np.floor((np.abs(avg) + 3) / 6)
    np.testing.assert_array_equal(IntegerAvgPool2d((2, 3), (2, 1))(y).numpy(), want)


def test_sequential_with_avgpool_symmetric_acts_no_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Dropout(0.1), nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3))
    model.eval()
    calib = [torch.rand(16, 1, 8, 8) for _ in range(3)]
    cfg = IntegerOnlyConfig(act_symmetric=True, per_channel=False, observer="histogram")
    im = IntegerModel(qkern.quantize_model(model, cfg, calibration=calib))
    x = torch.rand(8, 1, 8, 8)
    codes = im.quantize(x)
    rec = DtypeRecorder()
    with torch.no_grad(), rec:
        out = im(codes)
    assert out.dtype == torch.int8 and rec.seen and not floats(rec.seen)
    ref = model(x).detach()
    err = (im.dequantize(out) - ref).abs().max() / ref.abs().max()
    assert err < 0.1, float(err)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_layers_mode_inside_a_float_model():
    torch.manual_seed(2)
    model = TwoLinears().eval()
    calib = [torch.randn(4, 5, 16) for _ in range(4)]
    q = qkern.quantize_model(model, IntegerOnlyConfig(), calibration=calib)
    assert isinstance(q.a, IntegerLinearIO) and isinstance(q.b, IntegerLinearIO)
    assert q.a.layer.out_bits == 16
    x = torch.randn(3, 5, 16)
    ref = model(x).detach()
    assert (q(x) - ref).norm() / ref.norm() < 0.05
    codes = q.a.quant_in.quantize(x)
    rec = DtypeRecorder()  # inside the layer: integers only
    with torch.no_grad(), rec:
        out = q.a.layer(codes)
    assert not floats(rec.seen) and out.dtype == torch.int16
    # int16 output: the layer's output differs from the float rescale of its own int32
    # accumulator by the output rounding only (half an int16 step + the multiplier's error)
    a = q.a.layer
    acc = (codes.reshape(-1, 16).double() - a.in_zp) @ a.w_q.double().T + a.bias_q.double()
    m = a.m0.double() * 2.0 ** (a.shift.double() - 31)
    real = (acc * m * a.out_scale).reshape(3, 5, 32)
    deq = q.a.dequant_out.dequantize(out).double()
    inside = (out > a.qmin) & (out < a.qmax)  # not clamped at the calibrated range
    assert inside.float().mean() > 0.9
    assert ((deq - real)[inside]).abs().max() <= 0.5001 * a.out_scale + 1e-6 * real.abs().max()
    q8 = qkern.quantize_model(TwoLinears().eval(), IntegerOnlyConfig(layers_out_bits=8),
                              calibration=calib)
    assert q8.a.layer.out_bits == 8 and q8.a.layer(codes).dtype == torch.int8
    with pytest.raises(ValueError, match="nn.Sequential"):
        qkern.quantize_model(model, IntegerOnlyConfig(mode="model"), calibration=calib)


def test_config_checks_and_json():
    cfg = IntegerOnlyConfig(act_symmetric=True, mode="layers", exclude=["b"])
    assert BaseConfig.from_json(cfg.to_json()) == cfg
    assert BaseConfig.from_json(IntegerOnlyConfig(layers_out_bits=8).to_json()).layers_out_bits == 8
    for bad in (dict(mode="x"), dict(observer="nope"), dict(per_channel=1),
                dict(overrides={"a": "int4"}), dict(layers_out_bits=12),
                dict(layers_out_bits=True), dict(layers_out_bits=16.0)):
        with pytest.raises(ValueError):
            IntegerOnlyConfig(**bad)
    with pytest.raises(TypeError, match="int8"):
        IntegerLinear(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, dtype=torch.int32),
                      torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                      in_zp=0, out_zp=0)(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="qmin"):
        IntegerLinear(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, dtype=torch.int32),
                      torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                      in_zp=0, out_zp=0, qmin=5, qmax=4)
    with pytest.raises(ValueError, match="integer layers"):
        IntegerModel(nn.Sequential(nn.ReLU()))
