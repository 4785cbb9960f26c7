"""AWQ (GEMM layout) export and import, checked against the format's published layout.

The reader (``spec_unpack``) and packer (``spec_pack``) here follow AutoAWQ's GEMM layout
(qweight (K, N/8) int32: nibble i of word c holds output column 8c + [0,2,4,6,1,3,5,7][i];
qzeros the same over (K/G, N/8), zero points unshifted; scales float16 (K/G, N)), in numpy,
without qkern's code. Where AutoAWQ is on the path (``pip install --no-deps --target DIR
autoawq==0.2.9``, DIR on PYTHONPATH), its own ``dequantize_gemm`` (what its CPU forward runs)
reads qkern's export and its own ``WQLinear_GEMM.from_linear`` packs a checkpoint qkern
imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

import llm_models as LM
import qkern
from qkern import formats as QF
from qkern.interop.wna16 import fp16_scales
from qkern.layout import Layout
from qkern.models.assets import shipped_path
from qkern.nn import QuantLinear
from qkern.tensor import QTensor

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def spec_unpack(words: np.ndarray) -> np.ndarray:
    """(rows, N/8) int32 -> (rows, N): nibble i of word c is column 8c + ORDER[i]."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    rows, n8 = w.shape
    out = np.zeros((rows, n8 * 8), np.int64)
    for c in range(n8):
        for i in range(8):
            out[:, 8 * c + ORDER[i]] = (w[:, c] >> (4 * i)) & 0xF
    return out


def spec_pack(vals: np.ndarray) -> np.ndarray:
    rows, n = vals.shape
    words = np.zeros((rows, n // 8), np.uint64)
    for c in range(n // 8):
        for i in range(8):
            words[:, c] |= vals[:, 8 * c + ORDER[i]].astype(np.uint64) << np.uint64(4 * i)
    return words.astype(np.uint32).view(np.int32)


def spec_dequant(t: dict, name: str) -> np.ndarray:
    """W (N, K) float32 = (u - z) * s, groups of K / scales rows, each product rounded once."""
    u = spec_unpack(t[f"{name}.qweight"])               # (K, N)
    z = spec_unpack(t[f"{name}.qzeros"])                # (groups, N)
    s = t[f"{name}.scales"].astype(np.float32)
    g = np.arange(u.shape[0]) // (u.shape[0] // s.shape[0])
    return ((u - z[g]).astype(np.float32) * s[g]).T


def qlayers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def rtn(model, group_size, sym):
    return qkern.quantize_model(model, qkern.RTNConfig(bits=4, group_size=group_size, sym=sym))


@pytest.fixture(scope="module")
def llama():
    return LM.build("llama")


@pytest.mark.parametrize("group,sym", [(32, False), (64, True), (32, True)])
def test_export_read_by_spec(llama, tmp_path, group, sym):
    q = rtn(llama, group, sym)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    out = qkern.export(q, tmp_path / "m", format="awq")
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    t = load_file(str(out / "model.safetensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group,
                  "zero_point": True, "modules_to_not_convert": None}
    ref16 = fp16_scales(q)
    for name, m in qlayers(q).items():
        n, k = m.out_features, m.in_features
        assert t[f"{name}.qweight"].shape == (k, n // 8)
        assert t[f"{name}.qzeros"].shape == (k // group, n // 8)
        assert t[f"{name}.scales"].shape == (k // group, n)
        assert t[f"{name}.scales"].dtype == np.float16
        w = spec_dequant(t, name)
        assert np.array_equal(w, ref16.get_submodule(name).dequantize_weight().numpy()), name
        w0 = m.dequantize_weight().numpy()
        assert np.all(np.abs(w - w0) <= np.abs(w0) * 2.0 ** -11)
        if sym:
            assert np.all(spec_unpack(t[f"{name}.qzeros"]) == 8)
    assert np.array_equal(t["model.embed_tokens.weight"],
                          llama.state_dict()["model.embed_tokens.weight"].numpy())


def test_awq_algorithm_round_trip_logits(llama, tmp_path):
    q = qkern.quantize_model(llama, qkern.AWQConfig(bits=4, group_size=32, n_grid=4,
                                                    clip_grid=4), LM.calibration())
    out = qkern.export(q, tmp_path / "m", format="awq")
    back = qkern.from_pretrained(out)
    assert {m.kernel for m in qlayers(back).values()} == {"w4_exact"}
    ids = LM.calibration(seed=5)[0]
    got = LM.output(back, ids)
    assert torch.equal(got, LM.output(fp16_scales(q), ids))
    assert (got - LM.output(q, ids)).abs().max() < 1e-3


def test_float_layers_not_converted(llama, tmp_path):
    cfg = qkern.RTNConfig(bits=4, group_size=32, sym=False, exclude=["*.self_attn.o_proj"])
    q = qkern.quantize_model(llama, cfg)
    out = qkern.export(q, tmp_path / "m", format="awq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["model.layers.0.self_attn.o_proj",
                                            "model.layers.1.self_attn.o_proj"]
    back = qkern.from_pretrained(out)
    assert type(back.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    ids = LM.calibration()[0]
    assert torch.equal(LM.output(back, ids), LM.output(fp16_scales(q), ids))


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_architectures_round_trip(tmp_path, arch):
    q = rtn(LM.build(arch), 32, False)
    back = qkern.from_pretrained(qkern.export(q, tmp_path / "m", format="awq"))
    ids = LM.calibration()[0]
    assert torch.equal(LM.output(back, ids), LM.output(fp16_scales(q), ids))


def test_sharded_folder(llama, tmp_path):
    """The shards of model.safetensors.index.json load as one checkpoint."""
    q = rtn(llama, 32, True)
    out = qkern.export(q, tmp_path / "m", format="awq")
    t = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    keys = sorted(t)
    halves = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in halves.items():
        save_file({k: torch.from_numpy(t[k]) for k in ks}, str(out / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = LM.calibration()[0]
    assert torch.equal(LM.output(qkern.from_pretrained(out), ids), LM.output(fp16_scales(q), ids))


def test_bytelm_round_trip(tmp_path):
    path = shipped_path("models/wikitext-bytelm")
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path}: the shipped bytelm is missing")
    q = rtn(qkern.models.load_pretrained(path), 32, False)
    back = qkern.from_pretrained(qkern.export(q, tmp_path / "b", format="awq"))
    ids = torch.tensor([list(b"Robert Boulter is an English film, television and theatre")])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, fp16_scales(q)(ids).logits)


def hand_built(model, folder, group, seed=0):
    """An AWQ GEMM folder for ``model``: random codes, zero points (0..15, 0 included: AWQ
    stores them unshifted) and float16 scales per linear of the blocks, packed by spec_pack."""
    rng = np.random.default_rng(seed)
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4,
                                  "group_size": group, "zero_point": True}
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    want = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = m.out_features, m.in_features
        u = rng.integers(0, 16, (k, n))
        z = rng.integers(0, 16, (k // group, n))
        s = (rng.uniform(0.5, 2.0, z.shape) * 2.0 ** rng.integers(-9, -4, z.shape))
        s = s.astype(np.float16)
        g = np.arange(k) // group
        del tensors[f"{name}.weight"]
        tensors[f"{name}.qweight"] = torch.from_numpy(spec_pack(u))
        tensors[f"{name}.qzeros"] = torch.from_numpy(spec_pack(z))
        tensors[f"{name}.scales"] = torch.from_numpy(s)
        want[name] = ((u - z[g]).astype(np.float32) * s[g].astype(np.float32)).T
    os.makedirs(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return want


@pytest.mark.parametrize("arch,group", [("qwen2", 32), ("llama", 64)])
def test_import_spec_packed(tmp_path, arch, group):
    model = LM.build(arch)
    want = hand_built(model, tmp_path / "m", group)
    back = qkern.from_pretrained(tmp_path / "m")
    layers = qlayers(back)
    assert set(layers) == set(want)
    for name, w in want.items():
        assert layers[name].kernel == "w4_exact"
        assert np.array_equal(layers[name].dequantize_weight().numpy(), w), name
    sd, got = model.state_dict(), back.state_dict()
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    keys += ["model.layers.1.self_attn.k_proj.bias"] if arch == "qwen2" else []
    for key in keys:
        assert torch.equal(got[key], sd[key]), key


def test_import_refusals(tmp_path):
    model = LM.build("llama")
    hand_built(model, tmp_path / "m", 32)
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value, msg in (("version", "gemv", "gemv"), ("bits", 3, "4-bit"),
                            ("zero_point", False, "zero_point false")):
        bad = json.loads(json.dumps(cfg))
        bad["quantization_config"][key] = value
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            qkern.from_pretrained(tmp_path / "m")
    cfg_path.write_text(json.dumps(cfg))
    t = load_file(str(tmp_path / "m" / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.scales"] = t["model.layers.0.mlp.up_proj.scales"][:1]
    save_file({k: torch.from_numpy(v) for k, v in t.items()},
              str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj: qzeros"):
        qkern.from_pretrained(tmp_path / "m")


def single(qt: QTensor):
    m = LM.build("llama")
    m.model.layers[1].self_attn.o_proj = QuantLinear(qt, None)
    return m


@pytest.mark.filterwarnings("ignore:QuantLinear runs the slow")
def test_export_refusals(llama, tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        qkern.export(llama, tmp_path / "x", format="awq")
    q3 = qkern.quantize_model(llama, qkern.RTNConfig(bits=3, group_size=32, sym=False))
    with pytest.raises(ValueError, match="3-bit codes.*4-bit"):
        qkern.export(q3, tmp_path / "x", format="awq")
    with pytest.raises(ValueError, match="one group_size"):
        qkern.export(rtn(llama, None, False), tmp_path / "x", format="awq")
    lay = Layout("group", (64, 64), 1, 32)
    hqq = QTensor(torch.randint(0, 16, (64, 64), dtype=torch.uint8), torch.full((64, 2), 0.01),
                  torch.full((64, 2), 7.5), QF.get("uint4"), lay)
    with pytest.raises(ValueError, match="o_proj: float zero points"):
        qkern.export(single(hqq), tmp_path / "x", format="awq")
    q = rtn(llama, 32, False)
    with pytest.raises(ValueError, match="not float16 numbers"):
        qkern.export(q, tmp_path / "x", format="awq", exact=True)
    assert not (tmp_path / "x").exists()
    qkern.export(fp16_scales(q), tmp_path / "x", format="awq", exact=True)
    # an unsigned uint4 layer with a zero point of 0 is fine in AWQ (stored as it is)
    u = QTensor(torch.randint(0, 16, (64, 64), dtype=torch.uint8), torch.full((64, 2), 0.125),
                torch.zeros((64, 2), dtype=torch.int32), QF.get("uint4"), lay)
    out = qkern.export(single(u), tmp_path / "z", format="awq")
    back = qkern.from_pretrained(out).model.layers[1].self_attn.o_proj
    assert torch.equal(back.dequantize_weight(), u.dequantize())


# ---- AutoAWQ, the consumer -------------------------------------------------------------------


def _load(name, path):
    s = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


@pytest.fixture
def autoawq(monkeypatch):
    """AutoAWQ's packing_utils and linear/gemm modules, loaded from their files (the package's
    __init__ needs accelerate and model classes transformers 5 dropped); gemm.py's two helper
    imports are served: try_import (its own file) and get_best_device ("cpu")."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("AutoAWQ is not installed: pip install --no-deps --target DIR "
                    "autoawq==0.2.9 and put DIR on PYTHONPATH")
    root = spec.submodule_search_locations[0]
    pu = _load("awq.utils.packing_utils", os.path.join(root, "utils", "packing_utils.py"))
    um = _load("awq.utils.module", os.path.join(root, "utils", "module.py"))
    uu = types.ModuleType("awq.utils.utils")
    uu.get_best_device = lambda: "cpu"
    for name, mod in (("awq", types.ModuleType("awq")), ("awq.utils", types.ModuleType("u")),
                      ("awq.utils.packing_utils", pu), ("awq.utils.module", um),
                      ("awq.utils.utils", uu)):
        monkeypatch.setitem(sys.modules, name, mod)
    gemm = _load("awq_gemm_for_test", os.path.join(root, "modules", "linear", "gemm.py"))
    return pu, gemm


def test_autoawq_reads_export(llama, tmp_path, autoawq):
    pu, _ = autoawq
    q = rtn(llama, 32, False)
    t = load_file(str(qkern.export(q, tmp_path / "m", format="awq") / "model.safetensors"))
    ref16 = fp16_scales(q)
    for name in qlayers(q):
        w = pu.dequantize_gemm(torch.from_numpy(t[f"{name}.qweight"]),
                               torch.from_numpy(t[f"{name}.qzeros"]),
                               torch.from_numpy(t[f"{name}.scales"]).float(), 4, 32)
        assert torch.equal(w.T, ref16.get_submodule(name).dequantize_weight()), name


def test_import_autoawq_pack(tmp_path, autoawq):
    _, gemm = autoawq
    model = LM.build("llama")
    rng = np.random.default_rng(4)
    group = 32
    tensors = dict(model.state_dict())
    want = {}
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = lin.out_features, lin.in_features
        scales = torch.from_numpy(rng.uniform(0.004, 0.02, (k // group, n))).half().float()
        zeros = torch.from_numpy(rng.integers(0, 16, (k // group, n))).float()
        u = torch.from_numpy(rng.integers(0, 16, (n, k))).float()
        g = torch.arange(k) // group
        w = (u - zeros[g].T) * scales[g].T
        src = torch.nn.Linear(k, n, bias=False)
        src.weight.data = w
        layer = gemm.WQLinear_GEMM.from_linear(src, 4, group, scales=scales, zeros=zeros)
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{s}": getattr(layer, s) for s in ("qweight", "qzeros",
                                                                   "scales")})
        want[name] = w
    (tmp_path / "m").mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(tmp_path / "m" / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4,
                                  "group_size": group, "zero_point": True}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    back = qkern.from_pretrained(tmp_path / "m")
    for name, w in want.items():
        assert torch.equal(back.get_submodule(name).dequantize_weight(), w), name


def test_transformers_without_awq_backend(llama, tmp_path):
    """transformers 5 hands AWQ folders to gptqmodel; while gptqmodel does not import (absent,
    or its files without its dependencies, as for the GPTQModel test), loading refuses."""
    transformers = pytest.importorskip("transformers")
    try:
        importlib.import_module("gptqmodel")
    except Exception:
        pass
    else:
        pytest.skip("gptqmodel imports: transformers can load AWQ through it")
    out = qkern.export(rtn(llama, 32, False), tmp_path / "m", format="awq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = transformers.AwqConfig.from_dict(qc)  # its reading of the config
    assert (parsed.bits, parsed.group_size, parsed.zero_point, parsed.format) == \
        (4, 32, True, "gemm")
    with pytest.raises(ImportError):
        transformers.AutoModelForCausalLM.from_pretrained(str(out))
