"""GPTQ exports read by the consumers' own code, and checkpoints packed by AutoGPTQ's own
``pack`` imported by qkern. Skipped with the reason when a consumer is not on the path:

- auto-gptq 0.7.1 (``pip install --no-deps --target DIR auto-gptq==0.7.1``): its QuantLinear
  (``qlinear_cuda.py``, whose CPU path is plain torch and honours g_idx) and its ``pack``;
- GPTQModel 7.7.0 (``pip install --no-deps --target DIR gptqmodel==7.7.0``): its offline
  GPTQ reader ``utils/model_dequant.py: convert_gptq_file``;
- transformers 5.23 without optimum / gptqmodel: it refuses GPTQ folders (documented).
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
from gptq_spec import hand_built
from qkern.interop.wna16 import fp16_scales
from qkern.nn import QuantLinear


def qlayers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def rtn(model, bits, group_size, sym):
    return qkern.quantize_model(model, qkern.RTNConfig(bits=bits, group_size=group_size, sym=sym))


@pytest.fixture(scope="module")
def llama():
    return LM.build("llama")




def auto_gptq_qlinear():
    """auto-gptq's QuantLinear ("cuda" flavour, whose CPU path is plain torch and honours
    g_idx), loaded from its file (the package's __init__ pulls in accelerate, peft, ...)."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("auto-gptq is not installed: pip install --no-deps --target DIR "
                    "auto-gptq==0.7.1 and put DIR on PYTHONPATH")
    path = os.path.join(spec.submodule_search_locations[0], "nn_modules", "qlinear",
                        "qlinear_cuda.py")
    s = importlib.util.spec_from_file_location("auto_gptq_qlinear_cuda", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod.QuantLinear


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 32, True), (2, 64, False),
                                            (8, None, True)])
def test_auto_gptq_reads_export(llama, tmp_path, bits, group, sym):
    QL = auto_gptq_qlinear()
    q = rtn(llama, bits, group, sym)
    out = qkern.export(q, tmp_path / "m", format="gptq")
    t = load_file(str(out / "model.safetensors"))
    ref16 = fp16_scales(q)
    for name, m in qlayers(q).items():
        k, n = m.in_features, m.out_features
        layer = QL(bits, -1 if group is None else group, k, n, False)
        layer.load_state_dict({s: torch.from_numpy(t[f"{name}.{s}"])
                               for s in ("qweight", "qzeros", "scales", "g_idx")})
        layer.scales = layer.scales.float()  # its dequant in float32: (u - z) * s exactly
        with torch.no_grad():
            w = layer(torch.eye(k)).T  # I @ W^T: auto-gptq's dequantized weight
        assert torch.equal(w, ref16.get_submodule(name).dequantize_weight()), name


def test_auto_gptq_reads_act_order(tmp_path):
    QL = auto_gptq_qlinear()
    want = hand_built(LM.build("llama"), tmp_path / "a", 4, 32, False, act_order=True)
    out = qkern.export(qkern.from_pretrained(tmp_path / "a"), tmp_path / "b", format="gptq")
    t = load_file(str(out / "model.safetensors"))
    for name, w in want.items():
        k, n = w.shape[1], w.shape[0]
        layer = QL(4, 32, k, n, False)
        layer.load_state_dict({s: torch.from_numpy(t[f"{name}.{s}"])
                               for s in ("qweight", "qzeros", "scales", "g_idx")})
        layer.scales = layer.scales.float()
        with torch.no_grad():
            assert np.array_equal(layer(torch.eye(k)).T.numpy(), w), name


@pytest.mark.parametrize("bits", [4, 3])
def test_import_auto_gptq_pack(tmp_path, bits):
    """auto-gptq's own pack() writes the layers; qkern imports them to the same weights."""
    QL = auto_gptq_qlinear()
    model = LM.build("llama")
    rng = np.random.default_rng(3)
    group = 32
    tensors = {k: v for k, v in model.state_dict().items()}
    want = {}
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = lin.out_features, lin.in_features
        scales = torch.from_numpy(rng.uniform(0.004, 0.02, (n, k // group))).half().float()
        zeros = torch.from_numpy(rng.integers(1, 2 ** bits, (n, k // group))).float()
        u = torch.from_numpy(rng.integers(0, 2 ** bits, (n, k))).float()
        g = torch.arange(k) // group
        w = (u - zeros[:, g]) * scales[:, g]
        src = torch.nn.Linear(k, n, bias=False)
        src.weight.data = w
        layer = QL(bits, group, k, n, False, weight_dtype=torch.float32)
        layer.pack(src, scales, zeros, g.int())
        del tensors[f"{name}.weight"]
        for s in ("qweight", "qzeros", "g_idx"):
            tensors[f"{name}.{s}"] = getattr(layer, s)
        tensors[f"{name}.scales"] = layer.scales.half()
        want[name] = w
    (tmp_path / "m").mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(tmp_path / "m" / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group,
                                  "sym": False, "desc_act": False}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    back = qkern.from_pretrained(tmp_path / "m")
    for name, w in want.items():
        assert torch.equal(back.get_submodule(name).dequantize_weight(), w), name


@pytest.fixture
def gptqmodel_dequant(monkeypatch):
    """GPTQModel's offline dequantizer (gptqmodel/utils/model_dequant.py: convert_gptq_file,
    its CPU reader of GPTQ safetensors) loaded from its file; the package itself needs torch
    >= 2.14 and a dozen packages, so its two light imports are served by stand-ins (logger,
    float8/float4 dtype tables) and planar_packing.py is its own file."""
    spec = importlib.util.find_spec("gptqmodel")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("GPTQModel is not installed: pip install --no-deps --target DIR "
                    "gptqmodel==7.7.0 and put DIR on PYTHONPATH")
    root = spec.submodule_search_locations[0]
    dtype = types.ModuleType("gptqmodel.quantization.dtype")
    for fn in ("available_float4_packed_dtypes", "available_float8_dtype_names",
               "available_float8_dtypes"):
        setattr(dtype, fn, tuple)
    for fn in ("decode_e8m0_scale", "dequantize_f4_e2m1", "dequantize_fp8",
               "quark_floatx_formats"):
        setattr(dtype, fn, None)
    logger = types.ModuleType("gptqmodel.utils.logger")
    logger.setup_logger = lambda *a, **k: None
    for name in ("gptqmodel", "gptqmodel.utils", "gptqmodel.quantization"):
        pkg = types.ModuleType(name)
        pkg.__path__ = []
        monkeypatch.setitem(sys.modules, name, pkg)
    monkeypatch.setitem(sys.modules, dtype.__name__, dtype)
    monkeypatch.setitem(sys.modules, logger.__name__, logger)
    for name in ("planar_packing", "model_dequant"):
        s = importlib.util.spec_from_file_location(f"gptqmodel.utils.{name}",
                                                   os.path.join(root, "utils", f"{name}.py"))
        mod = importlib.util.module_from_spec(s)
        monkeypatch.setitem(sys.modules, s.name, mod)
        s.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 32, True), (2, 32, False),
                                            (8, None, True), (4, "act-order", False)])
def test_gptqmodel_reads_export(llama, tmp_path, gptqmodel_dequant, bits, group, sym):
    if group == "act-order":
        hand_built(LM.build("llama"), tmp_path / "a", bits, 32, sym, act_order=True)
        ref = qkern.from_pretrained(tmp_path / "a")
    else:
        ref = fp16_scales(rtn(llama, bits, group, sym))
    out = qkern.export(ref, tmp_path / "m", format="gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    t = gptqmodel_dequant.convert_gptq_file(out / "model.safetensors", torch.float32, qc, "cpu")
    for name, m in qlayers(ref).items():
        assert torch.equal(t[f"{name}.weight"], m.dequantize_weight()), name


def test_transformers_without_gptq_backend(llama, tmp_path):
    """transformers 5 hands GPTQ folders to optimum + gptqmodel; without them it refuses."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("optimum"):
        pytest.skip("optimum is installed: transformers goes on to gptqmodel")
    out = qkern.export(rtn(llama, 4, 32, True), tmp_path / "m", format="gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = transformers.GPTQConfig.from_dict(qc)  # its reading of the config
    assert (parsed.bits, parsed.group_size, parsed.sym, parsed.format) == (4, 32, True, "gptq")
    with pytest.raises((ImportError, RuntimeError), match="optimum|gptqmodel|GPU"):
        transformers.AutoModelForCausalLM.from_pretrained(str(out))
