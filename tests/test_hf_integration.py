"""qkern as a transformers quantization method: ``from_pretrained(quantization_config=
qkern.hf.QkernConfig(...))`` quantizes on load, ``save_pretrained`` -> ``from_pretrained``
round-trips (tokens and logits identical), and a model quantized by ``qkern.quantize_model``
saves a folder transformers loads back (the issue's silent UNEXPECTED/MISSING failure).

The reference for on-load quantization is ``qkern.quantize_model`` on the float model
transformers loads from the same folder (an independent path: the sequential pipeline on a
float32 model); every tensor must be equal. Loading is transformers' own ``from_pretrained``.
"""

from __future__ import annotations

import json
import warnings
import weakref
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the hf integration needs transformers")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.quantizers.auto import AutoQuantizationConfig  # noqa: E402

import llm_models as LM  # noqa: E402
import qkern  # noqa: E402
from qkern.hf import QkernConfig  # noqa: E402
from qkern.models import assets  # noqa: E402
from qkern.nn import QuantLinear  # noqa: E402

IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 8, 60, 12, 77, 3, 29]])


def _load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), **kw)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _greedy(model, ids=IDS, n=12):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "llama"
    LM.build("llama").save_pretrained(d)
    return d


@pytest.mark.parametrize("arch,cfg", [
    ("llama", qkern.RTNConfig(bits=4, group_size=32)),
    ("llama", qkern.RTNConfig(bits=3, group_size=32, sym=False)),
    ("qwen2", qkern.HQQConfig(bits=4, group_size=32, iters=5)),
    ("opt", qkern.RTNConfig(bits=8, group_size=None)),
    ("gpt2", qkern.RTNConfig(bits=4, group_size=32)),
])
def test_quantize_on_load_equals_quantize_model_and_round_trips(tmp_path, arch, cfg):
    LM.build(arch).save_pretrained(tmp_path / "float")
    q = _load(tmp_path / "float", quantization_config=QkernConfig(cfg))
    ref = qkern.quantize_model(_load(tmp_path / "float"), cfg)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) > 0
    assert q.config.quantization_config.layers == qkern.io.serialization.layer_specs(ref)
    _same_state(q, ref)
    assert torch.equal(_logits(q), _logits(ref))
    q.save_pretrained(tmp_path / "q", max_shard_size="40KB")  # several shards + index
    assert (tmp_path / "q" / "model.safetensors.index.json").is_file()
    back = _load(tmp_path / "q")  # no quantization_config: config.json says qkern
    _same_state(back, q)
    assert torch.equal(_logits(back), _logits(q))
    assert torch.equal(_greedy(back), _greedy(q))


def test_quantize_model_output_saves_and_loads_back(tmp_path, float_dir):
    """The issue's bug: save_pretrained of a quantize_model result wrote packed buffers that
    from_pretrained marked UNEXPECTED/MISSING (random weights, garbage, no error)."""
    model = _load(float_dir)
    q = qkern.quantize_model(model, qkern.GPTQConfig(bits=4, group_size=32, sym=False),
                             LM.calibration())
    assert model.config.to_dict().get("quantization_config") is None  # the user's model
    q.save_pretrained(tmp_path / "gptq")
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qkern" and qc["config"]["type"] == "GPTQConfig"
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _same_state(back, q)
    assert torch.equal(_logits(back), _logits(q))
    assert torch.equal(_greedy(back), _greedy(q))
    assert back.qkern_config == q.qkern_config


def test_bytelm_round_trip_through_transformers(tmp_path):
    """The shipped byte-level Llama: quantized on load (every block linear, 4 bits g32),
    generate, save, load: identical tokens and logits; same tensors as quantize_model."""
    path = assets.shipped_path("models/wikitext-bytelm")
    cfg = qkern.RTNConfig(bits=4, group_size=32)
    q = _load(path, quantization_config=QkernConfig(cfg))
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 4 * 7
    ref = qkern.quantize_model(qkern.models.load_pretrained(path), cfg)
    _same_state(q, ref)
    ids = torch.tensor([list(b"The tower is 324 metres tall, about the same")])
    tokens = _greedy(q, ids, 24)
    q.save_pretrained(tmp_path / "bytelm")
    back = _load(tmp_path / "bytelm")
    assert torch.equal(_greedy(back, ids, 24), tokens)
    assert torch.equal(_logits(back, ids), _logits(q, ids))
    assert torch.equal(_logits(back, ids), _logits(ref, ids))


def test_qkern_folder_format(tmp_path, float_dir):
    q = qkern.quantize_model(_load(float_dir), qkern.HQQConfig(bits=4, group_size=32, iters=3))
    out = qkern.export(q, tmp_path / "qk", format="qkern")
    assert qkern.interop.hf_quantizer.read_quant_method(out) == "qkern"
    back = qkern.from_pretrained(out)  # detected by config.json
    assert torch.equal(_logits(back), _logits(q))
    with pytest.raises(FileExistsError):
        qkern.export(q, out, format="qkern")
    qkern.export(q, out, format="qkern", overwrite=True)
    with pytest.raises(ValueError, match="no quantized layers"):
        qkern.export(_load(float_dir), tmp_path / "f", format="qkern")


def test_qkern_llama_exports_a_folder_transformers_loads(tmp_path):
    """qkern's own Llama (same tensor names as LlamaForCausalLM) -> a transformers folder."""
    m = qkern.models.load_llama(assets.shipped_path("models/wikitext-bytelm"))
    q = qkern.quantize_model(m, qkern.RTNConfig(bits=4, group_size=32, sym=False))
    out = qkern.export(q, tmp_path / "ql", format="qkern")
    back = _load(out)
    ids = torch.tensor([list(b"Valkyria Chronicles")])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, q(ids), rtol=0, atol=1e-4)


def test_replace_linear_result_saves_and_loads_back(tmp_path, float_dir):
    q = qkern.nn.replace_linear(_load(float_dir), {"fmt": "nf4", "group_size": 32},
                                skip=["lm_head"])
    q.save_pretrained(tmp_path / "rl")
    assert torch.equal(_logits(_load(tmp_path / "rl")), _logits(q))


def test_unattached_model_is_left_as_it_was_by_export(tmp_path, float_dir):
    """A model whose layers were swapped by hand has no config attached: export attaches
    one for its own save only."""
    q = _load(float_dir)
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"):
        lin = q.get_submodule(name)
        qkern.quantization.replace_module(q, name, QuantLinear.from_float(lin, "int4",
                                                                           group_size=32))
    qkern.export(q, tmp_path / "rl", format="qkern")
    assert getattr(q, "hf_quantizer", None) is None
    assert "quantization_config" not in q.config.to_dict()
    assert torch.equal(_logits(_load(tmp_path / "rl")), _logits(q))


def test_gpt2_float_linear_made_of_conv1d_is_saved_in_conv1d_layout(tmp_path):
    m = LM.build("gpt2")
    q = qkern.quantize_model(m, qkern.RTNConfig(bits=4, group_size=32, exclude=["*.mlp.c_proj"]))
    assert type(q.transformer.h[0].mlp.c_proj) is torch.nn.Linear  # linearized, float
    q.save_pretrained(tmp_path / "g")
    back = _load(tmp_path / "g")
    assert type(back.transformer.h[0].mlp.c_proj).__name__ == "Conv1D"
    assert torch.allclose(_logits(back), _logits(q), rtol=0, atol=1e-5)


def test_config_json_round_trip_and_api():
    c = QkernConfig(method="rtn", bits=3, group_size=64)
    assert c.config == qkern.RTNConfig(bits=3, group_size=64)
    d = json.loads(json.dumps(c.to_dict()))
    again = AutoQuantizationConfig.from_dict(d)
    assert isinstance(again, QkernConfig) and again.to_dict() == c.to_dict()
    assert QkernConfig(method="HQQConfig").config == qkern.HQQConfig()
    assert QkernConfig(c.config.to_dict()).config == c.config


@pytest.mark.parametrize("kw,exc,match", [
    ({"method": "nope"}, ValueError, "unknown method 'nope'"),
    ({"method": "rtn", "bitz": 4}, ValueError, "no field"),
    ({"method": "rtn", "bits": 9}, ValueError, "bits"),
    ({"config": 3}, TypeError, "must be a qkern config"),
    ({"config": qkern.RTNConfig(), "method": "rtn"}, TypeError, "not both"),
    ({"bits": 4}, TypeError, "unexpected keyword"),
    ({"quant_method": "gptq"}, ValueError, "quant_method"),
    ({"format_version": "99"}, ValueError, "format_version"),
    ({"layers": [1]}, TypeError, "layers"),
])
def test_bad_configs(kw, exc, match):
    with pytest.raises(exc, match=match):
        QkernConfig(**kw)


@pytest.mark.parametrize("cfg,match", [
    (qkern.GPTQConfig(bits=4, group_size=32), "needs calibration data"),
    (qkern.WeightOnlyConfig(), "LLM weight methods"),
    (None, "needs a qkern config"),
])
def test_on_load_refuses_what_it_cannot_do(float_dir, cfg, match):
    with pytest.raises(ValueError, match=match):
        _load(float_dir, quantization_config=QkernConfig(cfg))


def test_on_load_refuses_a_device_map(float_dir):
    pytest.importorskip("accelerate", reason="transformers wants accelerate for a device_map")
    with pytest.raises(ValueError, match="onto the CPU"):
        _load(float_dir, quantization_config=QkernConfig(qkern.RTNConfig()),
              device_map={"": "cuda:0"})


def test_save_refuses_a_model_that_would_not_load_back(tmp_path, float_dir):
    q = qkern.quantize_model(_load(float_dir), qkern.RTNConfig(bits=4, group_size=32))
    q.model.layers[0].extra = torch.nn.Linear(2, 2)  # no place in a fresh LlamaForCausalLM
    with pytest.raises(ValueError, match=r"(?s)would not load back.*extra\.weight"):
        q.save_pretrained(tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("*.safetensors"))
    with pytest.raises(ValueError, match="extra.weight"):
        qkern.export(q, tmp_path / "bad2", format="qkern")
    assert not (tmp_path / "bad2").exists()


def test_broken_folders_are_refused(tmp_path, float_dir):
    q = qkern.quantize_model(_load(float_dir), qkern.RTNConfig(bits=4, group_size=32))
    q.save_pretrained(tmp_path / "ok")
    # a packed buffer missing from the checkpoint
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.w4_scales"]
    (tmp_path / "cut").mkdir()
    save_file(sd, tmp_path / "cut" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "cut" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ValueError, match="lacks tensors.*up_proj.w4_scales"):
        _load(tmp_path / "cut")
    # a layer spec naming a layer the architecture does not have, and a malformed spec
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    layers = cfg["quantization_config"]["layers"]
    layers["model.layers.7.mlp.up_proj"] = layers["model.layers.1.mlp.up_proj"]
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not have"):
        _load(tmp_path / "ok")
    del layers["model.layers.7.mlp.up_proj"]
    layers["model.layers.1.mlp.up_proj"]["fmt"] = 4
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="field 'fmt' must be a string"):
        _load(tmp_path / "ok")
    cfg["quantization_config"]["layers"] = None
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lists no quantized layers"):
        _load(tmp_path / "ok")


def test_dequantize(float_dir):
    q = _load(float_dir, quantization_config=QkernConfig(qkern.RTNConfig(bits=4, group_size=32)))
    w = q.model.layers[0].self_attn.q_proj.dequantize_weight()
    d = q.dequantize()
    assert type(d.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(d.model.layers[0].self_attn.q_proj.weight, w)
    assert "quantization_config" not in d.config.to_dict()


def _tied_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=LM.VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("make,cfg,kinds", [
    (_tied_llama, qkern.WeightOnlyConfig(include=["Linear", "Embedding"]),
     {"QuantLinear/none", "QuantEmbedding/None"}),
    (lambda: LM.build("llama"), qkern.StaticConfig(), {"QuantLinear/int8_static"}),
    (lambda: LM.build("llama"), qkern.LLMInt8Config(), {"QuantLinear/int8_mixed"}),
    (lambda: LM.build("qwen3"), qkern.DynamicConfig(), {"QuantLinear/int8_dynamic"}),
])
def test_other_qkern_layers_round_trip(tmp_path, make, cfg, kinds):
    """Layers of the non-LLM configs (quantized embeddings, tied to a quantized LM head;
    static activation scales and LLM.int8 thresholds, read from the checkpoint by the layer
    constructors before transformers loads the rest)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qkern.quantize_model(make(), cfg, LM.calibration())
    specs = qkern.io.serialization.layer_specs(q)
    assert {f"{s['type']}/{s.get('act')}" for s in specs.values()} == kinds
    q.save_pretrained(tmp_path / "m")
    back = _load(tmp_path / "m")
    _same_state(back, q)
    assert torch.equal(_logits(back), _logits(q))


def test_bad_saved_values_are_refused(tmp_path):
    q = qkern.quantize_model(LM.build("llama"), qkern.StaticConfig(exclude=["Embedding"]),
                             LM.calibration())
    q.save_pretrained(tmp_path / "s")
    f = tmp_path / "s" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.mlp.down_proj.act_scale"] = torch.tensor([-1.0])
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="down_proj.act_scale.*positive"):
        _load(tmp_path / "s")


def test_qkern_load_result_saves_with_transformers(tmp_path, float_dir):
    """qkern.save / qkern.load (a qkern file rebuilt on a float transformers model) gives a
    model whose save_pretrained folder loads back too."""
    q = qkern.quantize_model(_load(float_dir), qkern.RTNConfig(bits=2, group_size=32))
    qkern.save(q, tmp_path / "q.safetensors")
    again = qkern.load(tmp_path / "q.safetensors", lambda: _load(float_dir))
    again.save_pretrained(tmp_path / "hf")
    assert torch.equal(_logits(_load(tmp_path / "hf")), _logits(q))


def test_docs_example_runs(tmp_path, monkeypatch):
    """docs/serving/transformers.md's example, as written."""
    doc = (Path(__file__).resolve().parents[1] / "docs/serving/transformers.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/serving/transformers.md", "exec"), {})
    assert (tmp_path / "bytelm-rtn4" / "config.json").is_file()


def test_quantize_on_load_holds_one_float_weight_at_a_time(float_dir, monkeypatch):
    """Each checkpoint weight is quantized as it arrives and dropped: when a layer has been
    quantized, no earlier float weight is still alive."""
    refs, most = [], [0]
    quantize = qkern.interop.hf_quantizer.QkernHfQuantizer.quantize_weight

    def spy(self, model, name, value, missing):
        quantize(self, model, name, value, missing)
        refs.append(weakref.ref(value))
        most[0] = max(most[0], sum(r() is not None for r in refs))

    monkeypatch.setattr(qkern.interop.hf_quantizer.QkernHfQuantizer, "quantize_weight", spy)
    _load(float_dir, quantization_config=QkernConfig(qkern.RTNConfig(bits=4, group_size=32)))
    assert len(refs) == 2 * 7 and most[0] == 1
