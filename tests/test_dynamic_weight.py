"""Weight-only dynamic quantization (DynamicWeightOnlyConfig, qkern.nn.DynamicWeightLinear):
the output against F.linear with a qkern.quantize + dequantize reference of the weight as it
is at the time of the call, in-place weight updates, the straight-through gradient, the
workflow, save / load and the input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkern
from qkern.nn import DynamicWeightLinear
from qkern.quantization import BaseConfig, DynamicWeightOnlyConfig

CASES = [("int8", None, True, dict(granularity="channel", axis=0)),
         ("int4", 32, False, dict(granularity="group", axis=1, group_size=32)),
         ("nf4", None, True, dict(granularity="group", axis=1, group_size=64))]


def ref(x, w, b, fmt, sym, kw):
    wq = qkern.quantize(w.detach(), fmt, symmetric=sym, **kw).dequantize()
    return F.linear(x, wq, b)


@pytest.mark.parametrize("fmt,group,sym,kw", CASES)
def test_matches_quantize_dequantize_and_follows_weight_updates(fmt, group, sym, kw):
    torch.manual_seed(0)
    lin = nn.Linear(128, 12)
    layer = DynamicWeightLinear.from_float(lin, fmt, group_size=group, symmetric=sym)
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(layer(x), ref(x, lin.weight, lin.bias, fmt, sym, kw))
        assert torch.equal(layer.dequantize_weight(),
                           qkern.quantize(lin.weight.detach(), fmt, symmetric=sym,
                                          **kw).dequantize())
        layer.weight.mul_(3.0).add_(0.01)  # in place: the next call quantizes the new weight
        layer.weight[0, :7] = 0.5
        assert torch.equal(layer(x), ref(x, layer.weight, lin.bias, fmt, sym, kw))
        assert not torch.equal(layer(x), ref(x, lin.weight, lin.bias, fmt, sym, kw))
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_weight_gets_the_straight_through_gradient():
    torch.manual_seed(1)
    layer = DynamicWeightLinear.from_float(nn.Linear(32, 4))  # int8 absmax: nothing clipped
    x = torch.randn(6, 32)
    gy = torch.randn(6, 4)
    layer(x).backward(gy)
    torch.testing.assert_close(layer.weight.grad, gy.T @ x)
    torch.testing.assert_close(layer.bias.grad, gy.sum(0))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.dequantize_weight()
    opt.step()
    assert not torch.equal(layer.dequantize_weight(), before)


def test_quantize_model_save_load(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    cfg = DynamicWeightOnlyConfig(fmt="int4", group_size=32, exclude=["2"])
    q = qkern.quantize_model(model, cfg)
    assert isinstance(q[0], DynamicWeightLinear) and isinstance(q[2], nn.Linear)
    x = torch.randn(3, 64)
    kw = dict(granularity="group", axis=1, group_size=32)
    with torch.no_grad():
        h = torch.relu(ref(x, model[0].weight, model[0].bias, "int4", True, kw))
        assert torch.equal(q(x), model[2](h))
    qkern.save(q, tmp_path / "d.safetensors")
    back = qkern.load(tmp_path / "d.safetensors", model)
    assert isinstance(back[0], DynamicWeightLinear) and back[0].group_size == 32
    assert torch.equal(back(x), q(x))
    assert back.qkern_config == cfg
    assert BaseConfig.from_json(cfg.to_json()) == cfg


def test_bad_input():
    with pytest.raises(ValueError, match="unknown format"):
        DynamicWeightOnlyConfig(fmt="int77")
    with pytest.raises(ValueError, match="group_size"):
        DynamicWeightOnlyConfig(group_size=0)
    with pytest.raises(ValueError, match="rounding"):
        DynamicWeightOnlyConfig(rounding="sideways")
    with pytest.raises(ValueError, match="does not divide"):
        DynamicWeightLinear.from_float(nn.Linear(50, 4), "int4", group_size=32)
    with pytest.raises(ValueError, match="symmetric only"):
        DynamicWeightLinear.from_float(nn.Linear(64, 4), "nf4", symmetric=False)
    with pytest.raises(TypeError, match="nn.Linear"):
        DynamicWeightLinear.from_float(nn.Conv1d(4, 4, 1))
    layer = DynamicWeightLinear.from_float(nn.Linear(16, 4))
    with pytest.raises(ValueError, match="last dim"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 16, dtype=torch.int64))
