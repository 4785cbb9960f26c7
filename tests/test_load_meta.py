"""qkern.load without a float copy: quantized layers built from shapes only (skeletons), models
built on the meta device / with qkern.empty_init / from a transformers config, sharded
checkpoints, clear errors for what the file lacks, and the peak memory of a load (measured in
a subprocess). References: the quantized model in memory that was saved (its outputs and
state dict, bit for bit) and layers quantized from real float weights (``from_float``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import qkern
from qkern.io import read_checkpoint
from qkern.io.serialization import BadFile, layer_specs, rebuild_layer
from qkern.models import Llama
from qkern.models.llama import LlamaConfig
from qkern.nn import DynamicWeightLinear, QuantConv2d, QuantEmbedding, QuantLinear

PYTHON_DIR = Path(qkern.__file__).resolve().parents[1]
CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def _llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    m = Llama(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    return m


def _saved_llama(tmp_path, config=None):
    q = _quiet(qkern.quantize_model, _llama(), config or qkern.RTNConfig(bits=4, group_size=32),
               progress=False)
    path = tmp_path / "q.safetensors"
    qkern.save(q, path)
    return q, path


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


IDS = torch.tensor([[1, 5, 9, 40, 77, 3]])


def test_meta_and_empty_init_loads_equal_the_saved_model(tmp_path):
    q, path = _saved_llama(tmp_path)
    want = q(IDS)
    float_model = _llama()
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    from_float = qkern.load(path, float_model)  # a real float model: only its structure used
    with qkern.empty_init():
        empty = Llama(CFG)
    assert all(p.is_meta for p in empty.parameters())
    from_empty = qkern.load(path, empty)
    from_factory = qkern.load(path, lambda: _llama(seed=5))  # other weights: all replaced
    for m in (from_float, from_empty, from_factory):
        _same_state(m, q)
        assert torch.equal(m(IDS), want)
        assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    for k, v in float_model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k
    assert all(not p.is_meta for p in float_model.parameters())


def test_torch_meta_device_model_names_the_unsaved_buffers(tmp_path):
    _, path = _saved_llama(tmp_path)
    with torch.device("meta"):
        m = Llama(CFG)
    with pytest.raises(BadFile, match=r"no file tensor for \['rope_cos', 'rope_sin'\].*"
                       r"qkern\.empty_init"):
        qkern.load(path, m)


def test_a_tensor_missing_from_the_file_is_named(tmp_path):
    q, path = _saved_llama(tmp_path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with qkern.empty_init():
        m = Llama(CFG)
    with pytest.raises(BadFile, match=r"missing in the file: \['model\.norm\.weight'\]"):
        qkern.load(bad, m)


def _reshard(path: Path, out: Path, parts: int, meta_in_index: bool) -> None:
    """``path`` rewritten as transformers' sharded layout: ``parts`` shards + index.json."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    out.mkdir()
    keys = sorted(tensors)
    wm = {}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {k: tensors[k] for k in keys[i::parts]}
        save_file(chunk, str(out / name), metadata=None if meta_in_index else meta)
        wm.update((k, name) for k in chunk)
    index = {"metadata": {"total_size": 1, **(meta if meta_in_index else {})}, "weight_map": wm}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("meta_in_index", [True, False])
def test_sharded_reads_equal_unsharded(tmp_path, meta_in_index):
    q, path = _saved_llama(tmp_path)
    folder = tmp_path / "sharded"
    _reshard(path, folder, 3, meta_in_index)
    one, meta1 = read_checkpoint(path, with_metadata=True)
    many, meta3 = read_checkpoint(folder, with_metadata=True)
    assert set(one) == set(many) and all(torch.equal(one[k], many[k]) for k in one)
    assert {k: meta3[k] for k in meta1} == meta1
    for src in (folder, folder / "model.safetensors.index.json"):
        back = qkern.load(src, _llama())
        _same_state(back, q)
        assert torch.equal(back(IDS), q(IDS))


def test_inconsistent_shards_are_refused(tmp_path):
    _, path = _saved_llama(tmp_path)
    folder = tmp_path / "sharded"
    _reshard(path, folder, 2, True)
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["model.ghost"] = d["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"missing from their shards: \['model\.ghost'\]"):
        read_checkpoint(folder)
    d["weight_map"].pop("model.ghost")
    d["weight_map"].pop("model.norm.weight")
    index.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"does not place in this shard: \['model\.norm"):
        read_checkpoint(folder)


def _conv_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1))


# (float model, build the quantized one from it): every layer type qkern.load rebuilds
CASES = {
    "int4_g32_asym": (lambda: nn.Sequential(nn.Linear(64, 48)), lambda m: nn.Sequential(
        QuantLinear.from_float(m[0], "int4", group_size=32, symmetric=False))),
    "nf4_double_quant": (lambda: nn.Sequential(nn.Linear(128, 32, bias=False)),
                         lambda m: nn.Sequential(QuantLinear.from_float(
                             m[0], "nf4", group_size=64, double_quant=True))),
    "int8_static": (lambda: nn.Sequential(nn.Linear(64, 32)), lambda m: nn.Sequential(
        QuantLinear.from_float(m[0], "int8", group_size=None, act="int8_static",
                               act_scale=0.05))),
    "int8_mixed": (lambda: nn.Sequential(nn.Linear(64, 32)), lambda m: nn.Sequential(
        QuantLinear.from_float(m[0], "int8", group_size=None, act="int8_mixed",
                               threshold=2.5))),
    "fp8": (lambda: nn.Sequential(nn.Linear(64, 32)), lambda m: nn.Sequential(
        QuantLinear.from_float(m[0], "fp8_e4m3", group_size=None))),
    "int3_fast": (lambda: nn.Sequential(nn.Linear(128, 64)), lambda m: nn.Sequential(
        QuantLinear.from_float(m[0], "int3", group_size=64, mode="fast"))),
    "embedding": (lambda: nn.Sequential(nn.Embedding(20, 32)), lambda m: nn.Sequential(
        QuantEmbedding.from_float(m[0], "int4", group_size=16, symmetric=False))),
    "conv": (_conv_model, lambda m: nn.Sequential(QuantConv2d.from_float(m[0], "int8"))),
    "dynamic": (lambda: nn.Sequential(nn.Linear(64, 32)), lambda m: nn.Sequential(
        DynamicWeightLinear.from_float(m[0], "int4", group_size=32))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_skeleton_layers_match_layers_quantized_from_weights(tmp_path, case):
    make_float, quantize = CASES[case]
    torch.manual_seed(1)
    float_model = make_float()
    q = _quiet(quantize, float_model)
    path = tmp_path / "m.safetensors"
    qkern.save(q, path)
    # the skeleton (built on a meta layer) has the from_float layer's kernel and buffers
    (name, spec), = layer_specs(q).items()
    with torch.device("meta"):
        meta_float = make_float()
    skel = _quiet(rebuild_layer, name, meta_float.get_submodule(name), spec, {}, "x")
    ref = q.get_submodule(name)
    assert getattr(skel, "kernel", None) == getattr(ref, "kernel", None)
    got = {k: (tuple(v.shape), v.dtype) for k, v in skel.state_dict().items()}
    assert got == {k: (tuple(v.shape), v.dtype) for k, v in ref.state_dict().items()}
    back = _quiet(qkern.load, path, lambda: _meta(make_float))
    _same_state(back, q)
    x = (torch.randint(0, 20, (3, 5)) if case == "embedding" else
         torch.randn(2, 4, 6, 6) if case == "conv" else torch.randn(3, q[0].in_features))
    assert torch.equal(back(x), q(x))


def _meta(make):
    with torch.device("meta"):
        return make()


def test_tied_weights_are_tied_again(tmp_path):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 32)
    head = nn.Linear(32, 50, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(32, 32), head)
    q = _quiet(qkern.quantize_model, model, qkern.WeightOnlyConfig(fmt="int8", group_size=None,
                                                                    exclude=["0", "2"]))
    path = tmp_path / "t.safetensors"
    qkern.save(q, path)
    back = qkern.load(path, model)
    assert back[0].weight is back[2].weight
    x = torch.randint(0, 50, (2, 7))
    assert torch.equal(back(x), q(x))


def test_config_builds_a_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    q = _quiet(qkern.quantize_model, model, qkern.RTNConfig(bits=4, group_size=32),
               progress=False)
    path = tmp_path / "hf.safetensors"
    qkern.save(q, path)
    back = _quiet(qkern.load, path, config=cfg)
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, q(IDS).logits)
    with pytest.raises(TypeError, match="exactly one"):
        qkern.load(path, model, config=cfg)


PEAK = textwrap.dedent("""
    import os, sys, torch, qkern
    sys.path.insert(0, {tests!r})
    from test_load_meta import _big
    def status(key):  # bytes
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith(key + ":"))
    def make(n):
        if not {empty!r}:
            return _big(n)
        with qkern.empty_init():
            return _big(n)
    qkern.load({tiny!r}, make(1))  # one-time costs (lazy imports of meta kernels ...) first
    m = make(8)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark (VmHWM, ru_maxrss) starts again from here
    base = status("VmRSS")
    out = qkern.load({path!r}, m)
    print(status("VmHWM") - base)
""")


def _big(n: int = 8) -> nn.Module:
    """``n`` 1792 x 1792 linears: 8 of them hold 26M parameters, 105 MB of float32."""
    return nn.Sequential(*[nn.Linear(1792, 1792, bias=False) for _ in range(n)])


@pytest.mark.parametrize("empty", [True, False], ids=["empty_init", "float_model"])
def test_peak_memory_of_a_load_is_the_quantized_model(tmp_path, empty):
    torch.manual_seed(0)
    cfg = qkern.WeightOnlyConfig(fmt="int4", group_size=128)
    for n, name in ((1, "tiny"), (8, "big")):
        qkern.save(qkern.quantize_model(_big(n), cfg, inplace=True),
                   tmp_path / f"{name}.safetensors")
    path = tmp_path / "big.safetensors"
    float_bytes = 8 * 1792 * 1792 * 4
    q_bytes = path.stat().st_size
    code = PEAK.format(tests=str(Path(__file__).parent), path=str(path), empty=empty,
                       tiny=str(tmp_path / "tiny.safetensors"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(PYTHON_DIR),
                              "OMP_NUM_THREADS": "1"},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.split()[-1])  # the load's peak above the resident set before it
    # the file's tensors once (read, not mapped twice), one layer's skeleton packing at a
    # time; no copy of the float model (a deep copy alone would add float_bytes = 105 MB)
    assert grew < q_bytes + 24 * 2**20, (grew, q_bytes, float_bytes)
    assert grew < float_bytes / 3


def _no_float_quantization(monkeypatch):
    """Any quantization of a float weight while loading fails the test."""
    def refuse(*a, **kw):
        raise AssertionError("a float weight was quantized while loading")

    for cls in (QuantLinear, QuantEmbedding, QuantConv2d, DynamicWeightLinear):
        monkeypatch.setattr(cls, "from_float", classmethod(refuse))


def test_loads_quantize_no_float_weight(tmp_path, monkeypatch):
    q, path = _saved_llama(tmp_path)
    _no_float_quantization(monkeypatch)
    back = qkern.load(path, _llama())
    assert torch.equal(back(IDS), q(IDS))


def test_from_pretrained_builds_no_float_weight_of_a_quantized_layer(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import qkern.hf  # noqa: F401  (registers the quantizer)
    from qkern.interop.hf_quantizer import placeholder

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    q = _quiet(qkern.quantize_model, transformers.LlamaForCausalLM(cfg).eval(),
               qkern.RTNConfig(bits=4, group_size=32), progress=False)
    q.save_pretrained(tmp_path / "q", max_shard_size="40KB")  # shards + index
    assert placeholder(nn.Linear(64, 32), "x").weight.is_meta
    _no_float_quantization(monkeypatch)
    back = _quiet(transformers.AutoModelForCausalLM.from_pretrained, str(tmp_path / "q"))
    _same_state(back, q)
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, q(IDS).logits)


def test_load_pretrained_reads_a_sharded_source_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from qkern.models import load_pretrained

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(tmp_path / "one")
    m.save_pretrained(tmp_path / "many", max_shard_size="40KB")
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 1
    one, many = load_pretrained(tmp_path / "one"), load_pretrained(tmp_path / "many")
    _same_state(one, many)
    assert set(read_checkpoint(tmp_path / "many")) == set(read_checkpoint(tmp_path / "one"))
