"""The quantization workflow: configs (validation, JSON), prepare/convert/quantize_model on
small conventional models, the converted layers against F.linear / F.conv / embedding lookups of
their own dequantized weights (torch's reference ops), save/load, bad input, and the user's
model left untouched."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkern
from qkern.nn import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from qkern.quantization import BaseConfig, Quantizer, config_class, register_quantizer


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 32), nn.ReLU(),
                         nn.Linear(32, 10))


class _TextModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(50, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).relu().mean(-1)
        return self.head(F.gelu(self.fc(h)))


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


CONFIGS = [
    qkern.WeightOnlyConfig(fmt="int8", group_size=None),
    qkern.WeightOnlyConfig(fmt="int4", group_size=32, symmetric=False),
    qkern.WeightOnlyConfig(fmt="fp8_e4m3", group_size=None),
    qkern.DynamicConfig(),
    qkern.DynamicConfig(act_granularity="per_tensor"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.to_json()[:60])
def test_layers_match_torch_ops_on_their_dequantized_weights(cfg):
    m = _cnn()
    before = _state(m)
    q = _quiet(qkern.quantize_model, m, cfg)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # untouched
    x = torch.randn(4, 3, 8, 8)
    h = x
    for layer in q:  # each converted layer vs the torch op on the weight it computes with
        if isinstance(layer, QuantConv2d):
            w = layer.dequantize_weight()
            ref = F.conv2d(h, w, layer.qlinear.bias, layer.stride, layer.padding)
        elif isinstance(layer, QuantLinear):
            ref = F.linear(h, layer.dequantize_weight(), layer.bias)
        else:
            ref = layer(h)
        got = layer(h)
        # dynamic activations: within int8 activation rounding; weight-only: float rounding
        tol = 2e-2 * ref.abs().max().item() if isinstance(cfg, qkern.DynamicConfig) else 1e-4
        assert (got - ref).abs().max().item() <= tol + 1e-6, type(layer).__name__
        h = ref
    kinds = [type(x).__name__ for x in q]
    assert kinds.count("QuantConv2d") == 2 and kinds.count("QuantLinear") == 2


@pytest.mark.parametrize("cfg", [qkern.WeightOnlyConfig(fmt="int8", group_size=None),
                                 qkern.WeightOnlyConfig(fmt="nf4", group_size=32)],
                         ids=["int8", "nf4"])
def test_text_model_embedding_conv1d_linear(cfg):
    m = _TextModel()
    ids = torch.randint(0, 50, (3, 7))
    q = qkern.quantize_model(m, cfg)  # no warning: every layer fits
    assert isinstance(q.emb, QuantEmbedding) and isinstance(q.conv, QuantConv1d)
    torch.testing.assert_close(q.emb(ids), F.embedding(ids, q.emb.dequantize_weight()))
    x = torch.randn(2, 32, 9)
    torch.testing.assert_close(q.conv(x), F.conv1d(x, q.conv.dequantize_weight(),
                                                   q.conv.qlinear.bias, padding=1),
                               atol=1e-5, rtol=1e-5)
    rel = (q(ids) - m(ids)).norm() / m(ids).norm()
    assert rel < (0.02 if cfg.fmt == "int8" else 0.15)


def test_block_format_that_does_not_fit_stays_float():
    with pytest.warns(UserWarning, match="left in float"):
        q = qkern.quantize_model(_cnn(), qkern.WeightOnlyConfig(fmt="nf4", group_size=32))
    assert type(q[0]) is nn.Conv2d and type(q[7]) is QuantLinear  # K = 27 vs K = 32


def test_include_exclude_and_overrides():
    m = _TextModel()
    cfg = qkern.WeightOnlyConfig(fmt="int4", group_size=32, exclude=["Embedding"],
                                 overrides={"head": "int8", "conv": None})
    q = _quiet(qkern.quantize_model, m, cfg)
    assert isinstance(q.emb, nn.Embedding) and isinstance(q.conv, nn.Conv1d)
    assert q.fc.weight_q.format.name == "int4" and q.head.weight_q.format.name == "int8"
    q2 = _quiet(qkern.quantize_model, m, qkern.WeightOnlyConfig(include=["fc", "Conv1d"]))
    assert type(q2.fc) is QuantLinear and type(q2.conv) is QuantConv1d
    assert type(q2.head) is nn.Linear and type(q2.emb) is nn.Embedding


def test_unsupported_layers_stay_float_with_a_warning():
    m = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(3))
    m(torch.randn(1, 4, 5, 5))
    m2 = nn.Sequential(nn.LSTM(4, 8), )
    with pytest.warns(UserWarning, match="left in float") as rec:
        q = qkern.quantize_model(m, qkern.WeightOnlyConfig(fmt="int8", group_size=None))
    assert "groups=2" in str(rec[0].message)
    assert type(q[0]) is nn.Conv2d and type(q[2]) is QuantLinear
    with pytest.warns(UserWarning, match="LSTM is not supported"):
        qkern.quantize_model(m2, qkern.DynamicConfig())


def test_group_fallback_is_reported():
    m = nn.Sequential(nn.Linear(48, 16))  # 128 does not divide 48
    with pytest.warns(UserWarning, match="does not divide"):
        q = qkern.quantize_model(m, qkern.WeightOnlyConfig(fmt="int4", group_size=128))
    assert q[0].weight_q.granularity == "channel"


def test_config_json_round_trip_and_validation():
    for cfg in CONFIGS + [qkern.StaticConfig(observer="percentile", exclude=["head"]),
                          qkern.ActivationOnlyConfig(act_fmt="uint8", overrides={"a.*": None})]:
        assert BaseConfig.from_json(cfg.to_json()) == cfg
    bad = [(qkern.WeightOnlyConfig, {"fmt": "int9"}, "fmt"),
           (qkern.WeightOnlyConfig, {"group_size": 0}, "group_size"),
           (qkern.WeightOnlyConfig, {"symmetric": 1}, "symmetric"),
           (qkern.WeightOnlyConfig, {"rounding": "banker"}, "rounding"),
           (qkern.WeightOnlyConfig, {"include": "fc"}, "include"),
           (qkern.WeightOnlyConfig, {"overrides": {"fc": {"fmtt": "int4"}}}, "fmtt"),
           (qkern.WeightOnlyConfig, {"overrides": {"fc": "int99"}}, "overrides"),
           (qkern.DynamicConfig, {"act_granularity": "per_row"}, "act_granularity"),
           (qkern.StaticConfig, {"observer": "magic"}, "observer"),
           (qkern.ActivationOnlyConfig, {"act_symmetric": "no"}, "act_symmetric")]
    for cls, kw, field in bad:
        with pytest.raises(ValueError, match=field):
            cls(**kw)
    with pytest.raises(ValueError, match="unknown config type"):
        BaseConfig.from_dict({"type": "NopeConfig"})


def test_workflow_errors():
    m = _cnn()
    with pytest.raises(ValueError, match="prepare"):
        qkern.convert(m, qkern.WeightOnlyConfig())
    with pytest.raises(TypeError, match="quant_config"):
        qkern.prepare(m, {"fmt": "int4"})
    with pytest.raises(ValueError, match="calibration"):
        qkern.quantize_model(m, qkern.StaticConfig())
    p = qkern.prepare(m, qkern.WeightOnlyConfig(fmt="int8", group_size=None))
    with pytest.raises(ValueError, match="prepared with"):
        qkern.convert(p, qkern.WeightOnlyConfig(fmt="int4"))
    q = _quiet(qkern.convert, p)
    assert type(q[0]) is QuantConv2d and q is p


def test_prepare_inplace_and_example_inputs():
    m = _cnn()
    p = qkern.prepare(m, qkern.WeightOnlyConfig(fmt="int8", group_size=None), inplace=True,
                      args=(torch.randn(1, 3, 8, 8),))
    assert p is m
    qkern.convert(p)
    assert type(m[0]) is QuantConv2d


def test_adding_an_algorithm():
    @config_class
    class SignConfig(BaseConfig):  # a dataclass-free config is fine when it has no fields
        pass

    @register_quantizer(SignConfig)
    class SignQuantizer(Quantizer):
        def convert(self, model):
            for name, _ in self.plan:
                lin = model.get_submodule(name)
                with torch.no_grad():
                    lin.weight.copy_(lin.weight.sign())

    q = qkern.quantize_model(_cnn(), SignConfig(include=["Linear"]))
    assert set(q[5].weight.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert type(q[0]) is nn.Conv2d


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: c.to_json()[:60])
def test_save_load_round_trip(cfg, tmp_path):
    m = _TextModel()
    q = _quiet(qkern.quantize_model, m, cfg)
    path = tmp_path / "q.safetensors"
    qkern.save(q, path)
    with pytest.raises(FileExistsError, match="overwrite"):
        qkern.save(q, path)
    qkern.save(q, path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]  # no temp files left
    ids = torch.randint(0, 50, (2, 6))
    r = _quiet(qkern.load, path, _TextModel)
    assert torch.equal(r(ids), q(ids)) and r.qkern_config == cfg
    fresh = _TextModel()
    before = _state(fresh)
    r2 = _quiet(qkern.load, path, fresh)
    assert torch.equal(r2(ids), q(ids))
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_load_reports_mismatches(tmp_path):
    q = _quiet(qkern.quantize_model, _cnn(), qkern.WeightOnlyConfig(fmt="int8", group_size=None))
    path = tmp_path / "q.safetensors"
    qkern.save(q, path)

    def wider():
        m = _cnn()
        m[5] = nn.Linear(72, 40)
        m[7] = nn.Linear(40, 10)
        return m

    with pytest.raises(ValueError, match="shape/dtype mismatch.*5"):
        _quiet(qkern.load, path, wider)
    with pytest.raises(ValueError, match="no layer"):
        _quiet(qkern.load, path, lambda: nn.Sequential(nn.Conv2d(3, 16, 3)))
    (tmp_path / "plain.safetensors").write_bytes((tmp_path / "q.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError):
        qkern.load(tmp_path / "plain.safetensors", _cnn)
    p = qkern.prepare(_cnn(), qkern.WeightOnlyConfig())
    with pytest.raises(ValueError, match="not converted"):
        qkern.save(p, tmp_path / "p.safetensors")


def test_static_act_int8_linear_matches_definition():
    lin = nn.Linear(64, 24)
    x = torch.randn(7, 64)
    sx = x.abs().max() / 127
    q = QuantLinear.from_float(lin, "int8", group_size=None, act="int8_static", act_scale=sx)
    assert q.kernel == "w8a8_static"
    xq = torch.clamp(torch.round(x / sx), -127, 127)  # float64-free: exact small ints
    w = q.dequantize_weight()
    sw = w.abs().amax(1) / 127
    codes = torch.round(w / sw[:, None])
    acc = xq.double() @ codes.double().T  # exact integer sums
    want = (acc.float() * sx) * sw + lin.bias.detach()
    torch.testing.assert_close(q(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="act_scale"):
        QuantLinear.from_float(lin, "int8", group_size=None, act="int8_static")
    with pytest.raises(ValueError, match="int8 weights"):
        QuantLinear.from_float(lin, "int4", group_size=32, act="int8_dynamic")
    _ = copy


def test_save_load_bias_created_by_bias_correction(tmp_path):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(32, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    calib = [torch.randn(16, 32) for _ in range(4)]
    q = _quiet(qkern.quantize_model, m, qkern.WeightOnlyConfig(fmt="int3", group_size=None,
                                                               bias_correction=True),
               calibration=calib)
    assert q[0].bias is not None  # created by the correction
    qkern.save(q, tmp_path / "bc.safetensors")
    r = _quiet(qkern.load, tmp_path / "bc.safetensors", m)
    x = torch.randn(3, 32)
    assert torch.equal(r(x), q(x)) and m[0].bias is None
