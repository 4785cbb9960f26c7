"""qkern.save / qkern.load of integer-only models (IntegerOnlyConfig), int8 attention
(QuantizedAttentionConfig) and low-rank-compensated layers (LowRankCompensationConfig):
each real model is converted, saved, loaded into a fresh float model (also built with
qkern.empty_init() / from a transformers folder with config=), and must give the in-memory
converted model's outputs bit for bit on real inputs; the loaded integer-only network runs
on integer tensors only (the dispatch recorder of test_integer_only); malformed specs and
files that do not fit the model are BadFile naming the problem."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import qkern
from qkern.io import read_safetensors, write_safetensors
from qkern.io.serialization import BadFile
from qkern.models import load_llama, load_pretrained
from qkern.models.assets import shipped_path
from qkern.models.llama import Llama, LlamaConfig
from qkern.nn import (
    CompensatedLinear,
    Int8Attention,
    IntegerConv2d,
    IntegerLinearIO,
    IntegerModel,
    LowRankLinear,
    QuantLinear,
)
from qkern.quantization import (
    IntegerOnlyConfig,
    LowRankCompensationConfig,
    QuantizedAttentionConfig,
    RTNConfig,
)

pytest.importorskip("sklearn")
from qkern.models import digits as D  # noqa: E402
from test_integer_only import DtypeRecorder, floats  # noqa: E402

BYTELM = "models/wikitext-bytelm"


def wiki(split: str, n: int, length: int = 64) -> torch.Tensor:
    data = shipped_path(f"data/wikitext-2/wiki.{split}.tokens").read_bytes()[: n * length]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long().view(n, length)


def rewrite(src, dst, edit) -> None:
    """``dst``: the qkern file ``src`` with its metadata changed by ``edit(meta)``."""
    tensors, meta = read_safetensors(src, with_metadata=True)
    edit(meta)
    write_safetensors(dst, {k: v.clone() for k, v in tensors.items()}, meta)


@pytest.fixture(scope="module")
def digits():
    data = D.load_data()
    return data, {k: D.train(k, data) for k in ("mlp", "cnn")}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_integer_only_roundtrip_bit_exact_and_integer_only(kind, digits, tmp_path):
    data, models = digits
    q = qkern.quantize_model(models[kind], IntegerOnlyConfig(),
                             calibration=list(data.x_calib.split(64)))
    path = tmp_path / "int.safetensors"
    qkern.save(q, path)
    with qkern.empty_init():
        skeleton = D.make_model(kind)
    for target in (D.make_model(kind), skeleton):
        back = qkern.load(path, target)
        assert [type(m) for m in back] == [type(m) for m in q]
        im, ref = IntegerModel(back), IntegerModel(q)
        codes = ref.quantize(data.x_test)
        rec = DtypeRecorder()
        with torch.no_grad(), rec:
            out = im(codes)
        assert out.dtype == torch.int8 and torch.equal(out, ref(codes))
        assert rec.seen and not floats(rec.seen), floats(rec.seen)[:5]
        assert torch.equal(im.predict(data.x_test), ref.predict(data.x_test))
        assert (im.input.scale, im.input.zero_point) == (ref.input.scale, ref.input.zero_point)
    assert any(isinstance(m, IntegerConv2d) for m in back) == (kind == "cnn")
    with pytest.raises(ValueError, match="IntegerModel.body"):
        qkern.save(IntegerModel(q), tmp_path / "wrapped.safetensors")


def test_integer_layers_mode_roundtrip(digits, tmp_path):
    data, models = digits
    q = qkern.quantize_model(models["mlp"], IntegerOnlyConfig(mode="layers"),
                             calibration=list(data.x_calib.split(64)))
    assert isinstance(q[1], IntegerLinearIO)
    qkern.save(q, tmp_path / "layers.safetensors")
    back = qkern.load(tmp_path / "layers.safetensors", lambda: D.make_model("mlp"))
    assert isinstance(back[1], IntegerLinearIO) and back[1].layer.out_bits == 16
    with torch.no_grad():
        assert torch.equal(back(data.x_test), q(data.x_test))


def test_integer_only_bad_specs(digits, tmp_path):
    data, models = digits
    q = qkern.quantize_model(models["mlp"], IntegerOnlyConfig(),
                             calibration=list(data.x_calib.split(64)))
    good = tmp_path / "good.safetensors"
    qkern.save(q, good)

    def edit_layer(name, **fields):
        def edit(meta):
            layers = json.loads(meta["qkern_layers"])
            layers[name].update(fields)
            meta["qkern_layers"] = json.dumps(layers)
        return edit

    cases = [(edit_layer("1", out_zp=300), "out_zp must be an int8 value"),
             (edit_layer("1", qmin="low"), "field 'qmin' must be an integer"),
             (edit_layer("1", per_channel=False), r"1\.m0.*shape/dtype mismatch|mismatch"),
             (edit_layer("3", type="IntegerReLU", zp=0), "IntegerReLU built from nn.ReLU"),
             (edit_layer("1", type="IntegerConv2d", stride=[1, 1], padding=[0, 0]),
              "built from nn.Conv2d")]
    for i, (edit, msg) in enumerate(cases):
        bad = tmp_path / f"bad{i}.safetensors"
        rewrite(good, bad, edit)
        with pytest.raises(BadFile, match=msg):
            qkern.load(bad, D.make_model("mlp"))
    # corrupted tensors: a negative multiplier, a shift out of range
    tensors, meta = read_safetensors(good, with_metadata=True)
    for key, value, msg in (("1.m0", -5, "multipliers must be >= 0"),
                            ("5.shift", 40, r"shifts must lie in \[-31, 30\]")):
        t = {k: v.clone() for k, v in tensors.items()}
        t[key][0] = value
        write_safetensors(tmp_path / "t.safetensors", t, meta, overwrite=True)
        with pytest.raises(BadFile, match=msg):
            qkern.load(tmp_path / "t.safetensors", D.make_model("mlp"))
    with pytest.raises(BadFile, match="the model has ReLU there"):  # another architecture
        qkern.load(good, D.make_model("cnn"))


@pytest.fixture(scope="module")
def bytelm_cfg():
    return LlamaConfig.from_dict(json.loads((shipped_path(BYTELM) / "config.json").read_text()))


@pytest.mark.parametrize("p_fmt,per_channel", [("uint8", False), ("fp8_e4m3", True)])
def test_int8_attention_roundtrip_qkern_llama(p_fmt, per_channel, bytelm_cfg, tmp_path):
    q = qkern.quantize_model(load_llama(shipped_path(BYTELM)),
                             QuantizedAttentionConfig(p_fmt=p_fmt, k_per_channel=per_channel),
                             calibration=[wiki("valid", 4)])
    path = tmp_path / "att.safetensors"
    qkern.save(q, path)
    with qkern.empty_init():
        skeleton = Llama(bytelm_cfg).eval()
    back = qkern.load(path, skeleton)
    for a, b in zip(back.model.layers, q.model.layers):
        att, ref = a.self_attn.qat_attention, b.self_attn.qat_attention
        assert isinstance(att, Int8Attention) and att.p_fmt == p_fmt
        for key in ("q_scale", "k_scale", "v_scale"):
            assert torch.equal(getattr(att, key), getattr(ref, key))
    x = wiki("test", 2, 128)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
        assert not torch.equal(back(x), load_llama(shipped_path(BYTELM))(x))  # it is int8
    # a scale the file corrupted, an attention the model does not have
    tensors, meta = read_safetensors(path, with_metadata=True)
    t = {k: v.clone() for k, v in tensors.items()}
    t["model.layers.0.self_attn.qat_attention.v_scale"][1] = float("nan")
    write_safetensors(tmp_path / "nan.safetensors", t, meta)
    with pytest.raises(BadFile, match="v_scale must be finite"):
        qkern.load(tmp_path / "nan.safetensors", load_llama(shipped_path(BYTELM)))
    for edit, msg in ((lambda s: s.update({"model.layers.0.mlp": s.pop(next(iter(s)))}),
                       "no hookable attention"),
                      (lambda s: next(iter(s.values())).update(p_fmt="int4"), "p_fmt must be"),
                      (lambda s: next(iter(s.values())).update(heads="4"), "'heads'")):
        def change(meta, edit=edit):
            specs = json.loads(meta["qkern_attention"])
            edit(specs)
            meta["qkern_attention"] = json.dumps(specs)
        rewrite(path, tmp_path / "b.safetensors", change)
        with pytest.raises(BadFile, match=msg):
            qkern.load(tmp_path / "b.safetensors", load_llama(shipped_path(BYTELM)))
        (tmp_path / "b.safetensors").unlink()


def test_int8_attention_roundtrip_transformers_config(tmp_path):
    """transformers' Llama from the shipped folder: loaded with config= (no weights built)
    the int8 attention is attached again through the attention registry."""
    pytest.importorskip("transformers")
    folder = shipped_path(BYTELM)
    q = qkern.quantize_model(load_pretrained(folder), QuantizedAttentionConfig(),
                             calibration=[wiki("valid", 4)])
    qkern.save(q, tmp_path / "hf.safetensors")
    back = qkern.load(tmp_path / "hf.safetensors", config=folder)
    assert isinstance(back.model.layers[1].self_attn.qat_attention, Int8Attention)
    x = wiki("test", 2, 128)
    with torch.no_grad():
        assert torch.equal(back(x).logits, q(x).logits)


@pytest.mark.parametrize("factor_fmt", [None, "int8"])
def test_low_rank_compensation_roundtrip_bytelm(factor_fmt, bytelm_cfg, tmp_path):
    cfg = LowRankCompensationConfig(base=RTNConfig(bits=4, group_size=32), rank=4,
                                    factor_fmt=factor_fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qkern.quantize_model(load_llama(shipped_path(BYTELM)), cfg, progress=False)
    comp = [n for n, m in q.named_modules() if isinstance(m, CompensatedLinear)]
    assert comp
    path = tmp_path / "lr.safetensors"
    qkern.save(q, path)
    with qkern.empty_init():
        skeleton = Llama(bytelm_cfg).eval()
    back = qkern.load(path, skeleton)
    assert [n for n, m in back.named_modules() if isinstance(m, CompensatedLinear)] == comp
    side = back.get_submodule(comp[0]).side
    assert side.rank == 4 and type(side.down) is (nn.Linear if factor_fmt is None
                                                  else QuantLinear)
    x = wiki("test", 2, 128)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    # the side path of a compensated layer must be a LowRankLinear spec
    def edit(meta):
        layers = json.loads(meta["qkern_layers"])
        layers[comp[0]]["side"] = layers[comp[0]]["base"]
        meta["qkern_layers"] = json.dumps(layers)
    rewrite(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(BadFile, match="'side' must be a LowRankLinear spec"):
        qkern.load(tmp_path / "bad.safetensors", load_llama(shipped_path(BYTELM)))


def test_plain_low_rank_linear_roundtrip(digits, tmp_path):
    data, models = digits
    model = D.make_model("mlp")
    model.load_state_dict(models["mlp"].state_dict())
    w = model[1].weight.detach()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    model[1] = LowRankLinear.from_factors(u[:, :16] * s[:16], vh[:16], model[1].bias)
    qkern.save(model, tmp_path / "svd.safetensors")
    back = qkern.load(tmp_path / "svd.safetensors", D.make_model("mlp"))
    assert isinstance(back[1], LowRankLinear) and back[1].bias is not None
    with torch.no_grad():
        assert torch.equal(back(data.x_test), model(data.x_test))


def test_transformers_integer_only_layers_save_pretrained_roundtrip(tmp_path):
    """A transformers BERT converted by IntegerOnlyConfig (layers mode) goes through
    save_pretrained / from_pretrained and comes back with its integer layers, giving the
    converted model's outputs exactly (before the layer specs it came back float)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    model = transformers.BertModel(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 100, (2, 7))} for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qkern.quantize_model(model, IntegerOnlyConfig(), calibration=calib)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        want = q(input_ids=ids).last_hidden_state
        assert not torch.equal(want, model(input_ids=ids).last_hidden_state)
    q.save_pretrained(tmp_path / "bert")
    back = transformers.BertModel.from_pretrained(tmp_path / "bert").eval()
    assert isinstance(back.encoder.layer[0].attention.self.query, IntegerLinearIO)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).last_hidden_state, want)
