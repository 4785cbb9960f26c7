"""qkern.load checks what it reads: a loaded layer passes the checks a freshly built one
passes (act_scale, scales, zero points), and a malformed file of any kind raises ValueError
naming the path and what is wrong (never AttributeError, KeyError, TypeError, RuntimeError or
RecursionError)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import qkern
from qkern.io import read_safetensors, write_safetensors
from qkern.nn import QuantEmbedding, QuantLinear


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _poisoned(tmp_path, model: nn.Module, key: str, value) -> str:
    """``model`` saved, then tensor ``key`` of the file set to ``value`` everywhere."""
    good = tmp_path / "good.safetensors"
    qkern.save(model, good, overwrite=True)
    tensors, meta = read_safetensors(good, with_metadata=True)
    tensors = {k: v.clone() for k, v in tensors.items()}
    assert key in tensors, sorted(tensors)
    tensors[key] = torch.full_like(tensors[key], value)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors, meta, overwrite=True)
    return str(bad)


def _lin() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 24)


def _static(lin):
    return nn.Sequential(QuantLinear.from_float(lin, "int8", group_size=None, act="int8_static",
                                                act_scale=0.05))


def _asym(fmt: str, group: int):
    return lambda lin: nn.Sequential(_quiet(QuantLinear.from_float, lin, fmt, group_size=group,
                                            symmetric=False))


def _act_quant(lin):
    torch.manual_seed(1)
    cal = [torch.randn(8, 64) for _ in range(2)]
    return qkern.quantize_model(nn.Sequential(lin), qkern.ActivationOnlyConfig(),
                                calibration=cal)


def _embedding(lin):
    torch.manual_seed(2)
    emb = nn.Embedding(10, 32)
    return nn.Sequential(QuantEmbedding.from_float(emb, "int4", group_size=16, symmetric=False))


# (build the quantized model from the float layer, tensor, bad value, what the error says)
POISON = [
    (_static, "0.act_scale", 0.0, "act_scale must be a positive finite number"),
    (_static, "0.act_scale", -1.0, "act_scale must be a positive finite number"),
    (_static, "0.act_scale", float("nan"), "act_scale must be a positive finite number"),
    (_static, "0.act_scale", float("inf"), "act_scale must be a positive finite number"),
    (_asym("int4", 32), "0.w4_zeros", 8, r"zero_point must lie in the code range \[-8, 7\]"),
    (_asym("int4", 32), "0.w4_zeros", -9, r"zero_point must lie in the code range \[-8, 7\]"),
    (_asym("int4", 32), "0.w4_scales", float("nan"), "scale must be finite"),
    (_asym("int2", 32), "0.w23_zeros", 2, r"zero_point must lie in the code range \[-2, 1\]"),
    (_asym("int4", 16), "0.zp", 100, r"zero_point must lie in the code range \[-8, 7\]"),
    (_asym("int4", 16), "0.scale", -1.0, "scale must be > 0"),
    (_act_quant, "0.scale", 0.0, "scale must be > 0"),
    (_act_quant, "0.scale", float("nan"), "scale must be finite"),
    (_act_quant, "0.zero_point", 1000, r"zero_point must lie in the code range \[-128, 127\]"),
    (_embedding, "0.zero_point", 9, r"zero_point must lie in the code range \[-8, 7\]"),
]


def _float_model(build) -> nn.Module:
    if build is _embedding:
        torch.manual_seed(2)
        return nn.Sequential(nn.Embedding(10, 32))
    return nn.Sequential(_lin())


@pytest.mark.parametrize("build, key, value, says", POISON,
                         ids=[f"{i}-{k}={v}" for i, (_, k, v, _) in enumerate(POISON)])
def test_loaded_values_pass_the_constructors_checks(tmp_path, build, key, value, says):
    float_model = _float_model(build)
    good_model = build(float_model[0])
    path = _poisoned(tmp_path, good_model, key, value)
    back = _quiet(qkern.load, tmp_path / "good.safetensors", float_model)  # the good file loads
    if not isinstance(float_model[0], nn.Embedding):
        x = torch.randn(3, 64)
        assert torch.equal(back(x), good_model(x))
    with pytest.raises(ValueError, match=re.escape(path) + f": tensor '{re.escape(key)}': "
                       + says) as err:
        _quiet(qkern.load, path, float_model)
    assert "input contains" not in str(err.value)


def test_a_nan_act_scale_is_a_bad_file_not_a_nan_input(tmp_path):
    path = _poisoned(tmp_path, _static(_lin()), "0.act_scale", float("nan"))
    with pytest.raises(ValueError) as err:
        qkern.load(path, nn.Sequential(_lin()))
    msg = str(err.value)
    assert msg.startswith(f"{path}: tensor '0.act_scale': ") and "input" not in msg, msg
