"""qkern.load checks what it reads: a loaded layer passes the checks a freshly built one
passes (act_scale, scales, zero points), and a malformed file of any kind raises ValueError
naming the path and what is wrong (never AttributeError, KeyError, TypeError, RuntimeError or
RecursionError)."""

from __future__ import annotations

import json
import re
import struct
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


# ---- malformed files ---------------------------------------------------------------------------

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def _good(tmp_path):
    """A valid file: layer "0" int4 (w4 kernel), layer "2" int8 with static activations."""
    m = _mlp()
    q = nn.Sequential(QuantLinear.from_float(m[0], "int4", group_size=32), nn.ReLU(),
                      QuantLinear.from_float(m[2], "int8", group_size=None, act="int8_static",
                                             act_scale=0.05))
    path = tmp_path / "good.safetensors"
    qkern.save(q, path, overwrite=True)
    return read_safetensors(path, with_metadata=True)


def _layers(fn):
    """A mutation of the decoded qkern_layers metadata."""
    def mutate(tensors, meta):
        layers = json.loads(meta["qkern_layers"])
        meta["qkern_layers"] = json.dumps(fn(layers))
    return mutate


def _spec(key, value, layer="0"):
    def fn(layers):
        if value is DELETE:
            del layers[layer][key]
        else:
            layers[layer][key] = value
        return layers
    return _layers(fn)


def _meta(key, value):
    def mutate(tensors, meta):
        if value is DELETE:
            del meta[key]
        else:
            meta[key] = value
    return mutate


def _tensor(key, fn):
    def mutate(tensors, meta):
        if fn is DELETE:
            del tensors[key]
        else:
            tensors[key] = fn(tensors[key])
    return mutate


DELETE = object()
DEEP = "[" * 100_000 + "]" * 100_000
ACTQ = {"type": "ActQuant", "fmt": "int8", "zero_point": False}

# (id, mutation of (tensors, metadata) of a good file, what the message says)
MALFORMED = [
    ("layers_bad_json", _meta("qkern_layers", "{"), "'qkern_layers' is not valid JSON"),
    ("layers_deep_json", _meta("qkern_layers", DEEP), "'qkern_layers' is JSON nested too deeply"),
    ("layers_a_list", _meta("qkern_layers", "[]"), "'qkern_layers' must be a JSON object"),
    ("layers_a_number", _meta("qkern_layers", "5"), "'qkern_layers' must be a JSON object"),
    ("spec_a_string", _layers(lambda ls: {**ls, "0": "QuantLinear"}),
     "layer '0': the spec must be a JSON object"),
    ("spec_no_type", _spec("type", DELETE), "layer '0': unknown quantized layer type null"),
    ("spec_type_a_list", _spec("type", [1]), r"layer '0': unknown quantized layer type \[1\]"),
    ("spec_unknown_type", _spec("type", "QuantFoo"), "unknown quantized layer type \"QuantFoo\""),
    ("spec_no_fmt", _spec("fmt", DELETE), "layer '0': the QuantLinear spec has no field 'fmt'"),
    ("spec_no_act", _spec("act", DELETE), "the QuantLinear spec has no field 'act'"),
    ("spec_fmt_a_number", _spec("fmt", 5), "field 'fmt' must be a string, got 5"),
    ("spec_unknown_fmt", _spec("fmt", "int99"), "layer '0' cannot be rebuilt.*int99"),
    ("group_size_a_string", _spec("group_size", "32"), "'group_size' must be an integer or null"),
    ("group_size_bool", _spec("group_size", True), "'group_size' must be an integer or null"),
    ("group_size_negative", _spec("group_size", -32), "layer '0' cannot be rebuilt"),
    ("group_size_huge", _spec("group_size", 10**30), "layer '0' cannot be rebuilt"),
    ("symmetric_a_string", _spec("symmetric", "yes"), "'symmetric' must be true or false"),
    ("unknown_act", _spec("act", "int9"), "layer '0' cannot be rebuilt.*act must be one of"),
    ("mode_a_number", _spec("mode", 5), "'mode' must be a string"),
    ("unknown_kernel", _spec("kernel", "w99_exact"), "saved with kernel 'w99_exact'"),
    ("kernel_a_number", _spec("kernel", 7), "'kernel' must be a string or null"),
    ("bias_a_string", _spec("bias", "no"), "'bias' must be true or false"),
    ("missing_module", _layers(lambda ls: {**ls, "9": ls["0"]}), "the model has no layer '9'"),
    ("not_a_module", _layers(lambda ls: {**ls, "0.weight": ls["0"]}),
     "the model has no layer '0.weight'"),
    ("root_layer", _layers(lambda ls: {**ls, "": ls["0"]}), "empty name"),
    ("wrong_module_type", _layers(lambda ls: {**ls, "1": ls["0"]}),
     "layer '1': the file has a QuantLinear built from an nn.Linear, the model has ReLU"),
    ("actquant_inner_a_string", _layers(lambda ls: {**ls, "0": {**ACTQ, "inner": "x"}}),
     "layer '0': field 'inner' must be an object or null"),
    ("actquant_inner_no_type", _layers(lambda ls: {**ls, "0": {**ACTQ, "inner": {"fmt": "x"}}}),
     "layer '0.module': unknown quantized layer type null"),
    ("actquant_no_zero_point", _layers(lambda ls: {**ls, "0": {"type": "ActQuant",
                                                              "fmt": "int8", "inner": None}}),
     "the ActQuant spec has no field 'zero_point'"),
    ("actquant_unknown_fmt", _layers(lambda ls: {**ls, "0": {**ACTQ, "fmt": "int99",
                                                            "inner": ls["0"]}}),
     "layer '0' cannot be rebuilt"),
    ("config_bad_json", _meta("qkern_config", "{"), "'qkern_config' is not valid JSON"),
    ("config_deep_json", _meta("qkern_config", DEEP), "'qkern_config' is JSON nested too deep"),
    ("config_a_list", _meta("qkern_config", "[1, 2]"), "'qkern_config' is not a valid config"),
    ("config_unknown_type", _meta("qkern_config", '{"type": "NopeConfig"}'),
     "'qkern_config' is not a valid config: unknown config type"),
    ("config_bad_field", _meta("qkern_config", '{"type": "WeightOnlyConfig", "fmt": 5}'),
     "'qkern_config' is not a valid config"),
    ("config_unknown_field", _meta("qkern_config", '{"type": "WeightOnlyConfig", "x": 1}'),
     "'qkern_config' is not a valid config"),
    ("no_format", _meta("qkern_format", DELETE), "qkern file format None"),
    ("no_layers", _meta("qkern_layers", DELETE), "not a qkern file"),
    ("tensor_shape", _tensor("0.w4_scales", lambda t: t[:1]), "shape/dtype mismatch"),
    ("tensor_dtype", _tensor("0.w4_packed", lambda t: t.to(torch.int16)), "shape/dtype mismatch"),
    ("tensor_missing", _tensor("0.w4_packed", DELETE), "missing in the file.*0.w4_packed"),
    ("act_scale_shape", _tensor("2.act_scale", lambda t: t.repeat(3)),
     "tensor '2.act_scale'"),
    ("act_scale_missing", _tensor("2.act_scale", DELETE), "missing in the file.*2.act_scale"),
]


@pytest.mark.parametrize("mutate, says", [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_files_raise_value_error_naming_path_and_problem(tmp_path, mutate, says):
    tensors, meta = _good(tmp_path)
    tensors = {k: v.clone() for k, v in tensors.items()}
    mutate(tensors, meta)
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, tensors, meta)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + says):
        _quiet(qkern.load, path, _mlp())


def _header(path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw


@pytest.mark.parametrize("case", ["truncated", "header_past_eof", "empty", "header_a_list",
                                  "header_not_utf8"])
def test_broken_safetensors_containers_raise_value_error(tmp_path, case):
    _good(tmp_path)
    n, raw = _header(tmp_path / "good.safetensors")
    data = {"truncated": raw[:len(raw) - 100],
            "header_past_eof": struct.pack("<Q", len(raw) * 4) + raw[8:],
            "empty": b"",
            "header_a_list": struct.pack("<Q", 2) + b"[]",
            "header_not_utf8": struct.pack("<Q", 2) + b"\xff\xfe"}[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        qkern.load(path, _mlp())
