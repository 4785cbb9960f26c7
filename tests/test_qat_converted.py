"""Bad input around QAT (issue 13, "Bad input"): invalid bit widths for every method, convert
before the batch that sets a method's ranges, learned scales gone non-positive, and training a
converted model (the QAT helpers, prepare() over converted layers, train() + backward), while
gradients to the inputs of quantized layers (QLoRA's adapters) keep flowing."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import qkern
from qkern.quantization import (
    QATConfig,
    WeightOnlyConfig,
    clip_latent_weights,
    inq_step,
    qat_regularization,
)
from qkern.quantization.qat import ConvertedModelTrainingWarning, QATLinear


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _trained(method: str, weight: int, activation: int | None):
    m = qkern.prepare(_net(), QATConfig(weight=weight, activation=activation, method=method))
    x = torch.rand(8, 16)
    if method == "inq":
        for _ in range(4):
            inq_step(m)
    m(x).square().mean().backward()
    return m, x


def _convert(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kernel fallback notes
        return qkern.convert(m)


# ---- bit widths ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,weight,activation", [
    ("ttq", 3, None), ("ttq", 1, None), ("xnor", 2, 1), ("xnor", 1, 8),
    ("binaryconnect", 2, None), ("abc", 4, 1), ("abc", 1, 4), ("inq", 1, None),
    ("dorefa", 9, None), ("lsq", 1, 8), ("lsq+", 4, 1), ("pact", 4, None), ("ste", 0, 8),
])
def test_invalid_bit_widths_name_the_field_and_method(method, weight, activation):
    want = rf"QATConfig\.(weight|activation) .*'{re.escape(method)}'"
    with pytest.raises(ValueError, match=want):
        QATConfig(method=method, weight=weight, activation=activation)


# ---- convert too early, scales gone bad ------------------------------------------------------
@pytest.mark.parametrize("method,weight,activation", [
    ("lsq", 4, 4), ("lsq+", 4, 4), ("pact", 4, 4), ("ste", 4, 4), ("abc", 1, 1),
    ("ste", 4, None),
])
def test_convert_before_the_first_batch_is_refused(method, weight, activation):
    m = qkern.prepare(_net(), QATConfig(weight=weight, activation=activation, method=method))
    with pytest.raises(ValueError, match="seen no data"):
        qkern.convert(m)
    assert isinstance(m[0], QATLinear)  # nothing converted


@pytest.mark.parametrize("method,weight,attr,what", [
    ("pact", 4, ("input_fake", "alpha"), "clip alpha"),
    ("ttq", 2, ("weight_fake", "w_n"), "W_n"),
    ("ttq", 2, ("weight_fake", "w_p"), "W_p"),
    ("lsq", 4, ("input_fake", "scale"), "scale"),
    ("lsq+", 4, ("weight_fake", "scale"), "scale"),
])
@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan")])
def test_a_learned_scale_gone_bad_is_named_at_forward_and_convert(method, weight, attr, what,
                                                                  bad):
    m, x = _trained(method, weight, 4)
    p = getattr(getattr(m[2], attr[0]), attr[1])
    with torch.no_grad():
        p.view(-1)[0] = bad
    want = rf" of 2[ .].*: the learned {what} went non-positive or non-finite"
    with pytest.raises(ValueError, match=want):
        m(x)
    with pytest.raises(ValueError, match=want):  # convert: refused, no layer left in float
        qkern.convert(m)
    assert isinstance(m[0], QATLinear) and isinstance(m[2], QATLinear)


# ---- training a converted model --------------------------------------------------------------
@pytest.mark.parametrize("method,weight,activation", [
    ("lsq", 4, 8), ("pact", 4, 4), ("binaryconnect", 1, None), ("inq", 4, None),
    ("ttq", 2, 8), ("xnor", 1, 1),
])
def test_qat_helpers_on_a_converted_model_raise(method, weight, activation):
    q = _convert(_trained(method, weight, activation)[0])
    for helper in (inq_step, clip_latent_weights, qat_regularization):
        with pytest.raises(ValueError, match=rf"{helper.__name__}: the model was converted.*"
                                             rf"then qkern.convert\(model\), calling "
                                             rf"{helper.__name__} during training"):
            helper(q)


def test_helpers_still_work_on_prepared_models():
    m, _ = _trained("pact", 4, 4)
    assert float(qat_regularization(m)) > 0
    clip_latent_weights(m)  # no BinaryConnect layer: nothing to clip
    assert qat_regularization(_net()) == 0.0  # a float model: nothing to regularize


@pytest.mark.parametrize("converted_by", ["qat", "ptq"])
def test_prepare_qat_over_converted_layers_raises(converted_by):
    if converted_by == "qat":
        q = _convert(_trained("lsq", 4, 8)[0])
    else:
        q = qkern.quantize_model(_net(), WeightOnlyConfig(fmt="int4", group_size=16))
    with pytest.raises(ValueError, match=r"QATConfig: the model holds converted quantized "
                                         r"layers \('0.*train it before convert"):
        qkern.prepare(q, QATConfig(weight=4, activation=8))


def test_training_a_converted_model_warns_clearly():
    q = _convert(_trained("lsq", 4, 8)[0])
    x = torch.rand(8, 16)
    assert not q.training  # convert leaves the model in eval mode
    assert not [n for n, p in q.named_parameters() if p.requires_grad]  # nothing to train
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = q(x)  # eval: no warning
        q.train()
        with torch.no_grad():
            torch.testing.assert_close(q(x), y)  # no gradients wanted: no warning
    with pytest.warns(ConvertedModelTrainingWarning, match=r"was converted \(qkern.convert\) "
                      r"and is in training mode, but nothing in it can train"):
        out = q(x)
    with pytest.raises(RuntimeError):  # torch: nothing requires grad
        out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(x)  # once per model


def test_converted_layers_still_pass_gradients_to_inputs_and_adapters():
    """QLoRA: adapters beside frozen quantized layers train; the inputs get gradients."""
    q = _convert(_trained("lsq", 4, 8)[0])
    q.train()
    x = torch.rand(8, 16, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0

    class WithAdapter(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.adapter = base, nn.Linear(16, 4, bias=False)

        def forward(self, t):
            return self.base(t) + self.adapter(t)

    model = WithAdapter(q).train()
    with pytest.warns(ConvertedModelTrainingWarning):  # the converted part itself: frozen
        loss = model(torch.rand(8, 16)).square().mean()
    loss.backward()
    assert model.adapter.weight.grad is not None
