"""GPTQ (v1) export and import, checked against the format's published layout: the numpy
reader and packer of ``gptq_spec.py`` (written from the layout, no qkern code) read qkern's
exports and write the checkpoints qkern imports; round trips on a tiny Llama and the bytelm;
what is refused. The consumers' own code (auto-gptq, GPTQModel, transformers) is in
``test_interop_gptq_consumers.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

import llm_models as LM
import qkern
from gptq_spec import hand_built, spec_dequant, spec_unpack
from qkern import formats as QF
from qkern.interop.gptq import ActOrderQuantLinear
from qkern.interop.wna16 import fp16_scales
from qkern.layout import Layout
from qkern.models.assets import shipped_path
from qkern.nn import QuantLinear
from qkern.nn.hadamard import HadamardInput
from qkern.tensor import QTensor


def qlayers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def rtn(model, bits, group_size, sym):
    return qkern.quantize_model(model, qkern.RTNConfig(bits=bits, group_size=group_size, sym=sym))


@pytest.fixture(scope="module")
def llama():
    return LM.build("llama")


# ---- export: the exported tensors read by the spec reader ---------------------------------


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (3, 32, True),
                                            (3, 32, False), (2, 32, False), (8, None, True),
                                            (4, None, False)])
def test_export_read_by_spec(llama, tmp_path, bits, group, sym):
    q = rtn(llama, bits, group, sym)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    out = qkern.export(q, tmp_path / "m", format="gptq")
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # untouched
    t = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert (qc["bits"], qc["sym"], qc["desc_act"]) == (bits, sym, False)
    assert qc["group_size"] == (-1 if group is None else group)
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    ref16 = fp16_scales(q)
    for name, m in qlayers(q).items():
        n, k = m.out_features, m.in_features
        g = k if group is None else group
        assert t[f"{name}.qweight"].dtype == np.int32
        assert t[f"{name}.qweight"].shape == (k * bits // 32, n)
        assert t[f"{name}.qzeros"].shape == (k // g, n * bits // 32)
        assert t[f"{name}.scales"].dtype == np.float16 and t[f"{name}.scales"].shape == (k // g, n)
        assert np.array_equal(t[f"{name}.g_idx"], np.arange(k) // g)
        w = spec_dequant(t, name, bits)
        exact = ref16.get_submodule(name).dequantize_weight().numpy()
        assert np.array_equal(w, exact), name
        w0 = m.dequantize_weight().numpy()  # float32 scales: within float16's rounding
        assert np.all(np.abs(w - w0) <= np.abs(w0) * 2.0 ** -11), name
        if sym:  # symmetric: stored zero 2^(bits-1) - 1
            assert np.all(spec_unpack(t[f"{name}.qzeros"], bits, 1) == 2 ** (bits - 1) - 1)
    # the float tensors as they are; no packed qkern buffer leaks into the folder
    sd = llama.state_dict()
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert np.array_equal(t[key], sd[key].numpy())
    assert not any(".w4_" in k or ".w23_" in k or ".w8_" in k for k in t)


def test_gptq_algorithm_round_trip_logits(llama, tmp_path):
    """qkern's GPTQ (asym, act_order with static groups: contiguous groups, g_idx = k // G)
    -> export -> from_pretrained: the logits of the fp16-scale model, bit for bit."""
    cfg = qkern.GPTQConfig(bits=4, group_size=32, sym=False, act_order=True, static_groups=True)
    q = qkern.quantize_model(llama, cfg, LM.calibration())
    out = qkern.export(q, tmp_path / "m", format="gptq")
    back = qkern.from_pretrained(out)
    assert {n: m.kernel for n, m in qlayers(back).items()} == \
        {n: m.kernel for n, m in qlayers(q).items()}
    ids = LM.calibration(seed=7)[0]
    ref = LM.output(fp16_scales(q), ids)
    got = LM.output(back, ids)
    assert torch.equal(got, ref)
    assert (got - LM.output(q, ids)).abs().max() < 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen3", "bert"])
def test_architectures_round_trip(tmp_path, arch):
    """GPT-2's Conv1D layers (stored as linears), tied embeddings (GPT-2, OPT), biases, an
    encoder: the import gives the fp16-scale model's outputs bit for bit."""
    q = rtn(LM.build(arch), 4, 32, False)
    back = qkern.from_pretrained(qkern.export(q, tmp_path / "m", format="gptq"))
    ids = LM.calibration()[0]
    assert torch.equal(LM.output(back, ids), LM.output(fp16_scales(q), ids))


def test_bytelm_round_trip(tmp_path):
    path = shipped_path("models/wikitext-bytelm")
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path}: the shipped bytelm is missing")
    model = qkern.models.load_pretrained(path)
    q = rtn(model, 4, 32, False)
    out = qkern.export(q, tmp_path / "b", format="gptq")
    back = qkern.from_pretrained(out)
    ids = torch.tensor([list(b"The tower is 324 metres tall, about the same height")])
    with torch.no_grad():
        ref, got = fp16_scales(q)(ids).logits, back(ids).logits
    assert torch.equal(got, ref)
    # 128 does not divide the MLP's 672 inputs: one group_size cannot describe the model
    with pytest.warns(UserWarning, match="per output channel"):
        q128 = rtn(model, 4, 128, False)
    with pytest.raises(ValueError, match="one group_size"):
        qkern.export(q128, tmp_path / "c", format="gptq")


def test_config_variants(llama, tmp_path):
    """A block linear left in float goes to GPTQModel's "dynamic" skip list; float16 float
    tensors on request; a folder whose only GPTQ config is quantize_config.json loads."""
    cfg = qkern.RTNConfig(bits=4, group_size=32, sym=True, exclude=["*.mlp.down_proj"])
    q = qkern.quantize_model(llama, cfg)
    out = qkern.export(q, tmp_path / "m", format="gptq", dtype=torch.float16)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {r"-:^model\.layers\.0\.mlp\.down_proj$": {},
                             r"-:^model\.layers\.1\.mlp\.down_proj$": {}}
    assert qc["lm_head"] is False
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == np.float16
    assert t["model.embed_tokens.weight"].dtype == np.float16
    back = qkern.from_pretrained(out)
    assert type(back.model.layers[0].mlp.down_proj) is torch.nn.Linear
    ids = LM.calibration()[0]
    assert (LM.output(back, ids) - LM.output(q, ids)).abs().max() < 2e-3
    cfg_file = out / "config.json"
    c = json.loads(cfg_file.read_text())
    del c["quantization_config"]
    cfg_file.write_text(json.dumps(c))
    assert torch.equal(LM.output(qkern.from_pretrained(out), ids), LM.output(back, ids))


# ---- import: checkpoints written by the spec packer --------------------------------------


@pytest.mark.filterwarnings("ignore:QuantLinear runs the slow")
@pytest.mark.parametrize("bits,group,sym,v2", [(4, 32, False, False), (4, 64, True, False),
                                               (3, 32, False, False), (2, 32, True, False),
                                               (8, 32, False, False), (4, 32, False, True)])
def test_import_spec_packed(tmp_path, bits, group, sym, v2):
    model = LM.build("qwen2")  # q/k/v carry biases
    want = hand_built(model, tmp_path / "m", bits, group, sym, v2=v2)
    back = qkern.from_pretrained(tmp_path / "m")
    layers = qlayers(back)
    assert set(layers) == set(want)
    kinds = {m.kernel for m in layers.values()}
    assert kinds == {"w4_exact" if bits == 4 else "w23_exact" if bits < 4 else "dequant"}
    for name, w in want.items():
        assert np.array_equal(layers[name].dequantize_weight().numpy(), w), name
        q = layers[name].quantized_weight()
        assert q.format.name == f"int{bits}" and (q.zero_point is None) == sym
    sd = model.state_dict()
    got = back.state_dict()
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias",
                "model.norm.weight"):
        assert torch.equal(got[key], sd[key]), key
    ids = LM.calibration()[0]
    x = LM.output(back, ids)
    assert torch.isfinite(x).all()


def test_act_order_import_and_export(tmp_path):
    """desc_act: g_idx permuted. qkern sorts the columns by group and permutes the input;
    exporting the imported model writes the checkpoint's own tensors back."""
    model = LM.build("qwen2")
    want = hand_built(model, tmp_path / "a", 3, 32, False, act_order=True)
    back = qkern.from_pretrained(tmp_path / "a")
    for name, w in want.items():
        layer = back.get_submodule(name)
        assert isinstance(layer, ActOrderQuantLinear) and layer.kernel == "w23_exact"
        assert np.array_equal(layer.dequantize_weight().numpy(), w), name
        x = torch.randn(5, layer.in_features)
        ref = x.double() @ torch.from_numpy(w).double().T
        ref = ref + (0 if layer.bias is None else layer.bias.double())
        assert torch.allclose(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    ids = LM.calibration()[0]  # its scales are float16 already: fp16_scales keeps it as is
    assert torch.equal(LM.output(fp16_scales(back), ids), LM.output(back, ids))
    out = qkern.export(back, tmp_path / "b", format="gptq")
    a, b = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "a", out))
    for key in a:
        if key.endswith(("qweight", "qzeros", "scales", "g_idx")):
            assert np.array_equal(a[key], b[key]), key
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"]
    with pytest.raises(ValueError, match="q_proj: a GPTQ act-order layer"):
        qkern.export(back, tmp_path / "c", format="awq")
    # groups of unequal size cannot be made contiguous groups of G
    t = load_file(str(tmp_path / "a" / "model.safetensors"))
    g = t["model.layers.0.mlp.down_proj.g_idx"]
    g[g == 1] = 0
    save_file({k: torch.from_numpy(v) for k, v in t.items()},
              str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(ValueError, match="down_proj: g_idx groups are not all of 32"):
        qkern.from_pretrained(tmp_path / "a")


def test_import_refusals(tmp_path):
    model = LM.build("llama")
    # a stored v1 zero of 15 (zero 16, or a mangled 0): ambiguous
    hand_built(model, tmp_path / "b", 4, 32, False)
    t = load_file(str(tmp_path / "b" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.qzeros"
    t[name] = t[name] | np.int32(0xF)
    save_file({k: torch.from_numpy(v) for k, v in t.items()},
              str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj.*ambiguous"):
        qkern.from_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "marlin"
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="marlin"):
        qkern.from_pretrained(tmp_path / "b", format="gptq")
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        qkern.from_pretrained(shipped_path("models/wikitext-bytelm"), format="gptq")


# ---- export refusals -----------------------------------------------------------------------


def single(qt: QTensor, bias=None):
    m = LM.build("llama")
    m.model.layers[0].mlp.up_proj = QuantLinear(qt, bias)
    return m


def group_q(fmt, codes, scale, zp, g=32):
    shape = tuple(codes.shape)
    return QTensor(codes, scale, zp, QF.get(fmt), Layout("group", shape, 1, g))


@pytest.mark.filterwarnings("ignore:QuantLinear runs the slow")
def test_export_refusals(llama, tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        qkern.export(llama, tmp_path / "x", format="gptq")
    codes = torch.randint(-8, 8, (128, 64), dtype=torch.int8)
    scale = torch.full((128, 2), 0.01)
    zp = torch.zeros((128, 2), dtype=torch.int32)
    zp[3, 1] = -8  # GPTQ zero point 0: v1 stores -1
    with pytest.raises(ValueError, match="up_proj: a zero point of 0"):
        qkern.export(single(group_q("int4", codes, scale, zp)), tmp_path / "x", format="gptq")
    hqq = group_q("uint4", (codes + 8).to(torch.uint8), scale, torch.full((128, 2), 7.5))
    with pytest.raises(ValueError, match="up_proj: float zero points"):
        qkern.export(single(hqq), tmp_path / "x", format="gptq")
    with pytest.raises(ValueError, match="exceeds float16"):
        qkern.export(single(group_q("int4", codes, torch.full((128, 2), 1e5), None)),
                     tmp_path / "x", format="gptq")
    q5 = group_q("int5", torch.randint(-16, 16, (128, 64), dtype=torch.int8), scale, None)
    with pytest.raises(ValueError, match="5-bit codes"):
        qkern.export(single(q5), tmp_path / "x", format="gptq")
    nf4 = group_q("nf4", torch.randint(0, 16, (128, 64), dtype=torch.uint8), scale, None)
    with pytest.raises(ValueError, match="not an integer grid"):
        qkern.export(single(nf4), tmp_path / "x", format="gptq")
    # weight-only: quantized activations and qkern modules the loaders would not run
    m = rtn(llama, 4, 32, True)
    lin = torch.nn.Linear(64, 64)
    m.model.layers[1].self_attn.o_proj = QuantLinear.from_float(lin, "int8", group_size=None,
                                                                act="int8_dynamic")
    q_proj = m.model.layers[0].self_attn.q_proj
    m.model.layers[0].self_attn.q_proj = HadamardInput(q_proj, torch.ones(64))
    with pytest.raises(ValueError) as e:
        qkern.export(m, tmp_path / "x", format="gptq")
    assert "q_proj: a qkern HadamardInput" in str(e.value)
    assert "o_proj: activations quantized (act='int8_dynamic')" in str(e.value)
    # exact=True: float32 scales float16 cannot hold are refused; fp16_scales makes them so
    q = rtn(llama, 4, 32, True)
    with pytest.raises(ValueError, match="not float16 numbers"):
        qkern.export(q, tmp_path / "x", format="gptq", exact=True)
    assert not (tmp_path / "x").exists()
    out = qkern.export(fp16_scales(q), tmp_path / "x", format="gptq", exact=True)
    with pytest.raises(FileExistsError):
        qkern.export(q, out, format="gptq")
    qkern.export(q, out, format="gptq", overwrite=True)
    with pytest.raises(TypeError, match="exact"):
        qkern.export(q, tmp_path / "y", format="gptq", exact="yes")
