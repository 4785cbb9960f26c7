"""compressed-tensors export / import, verified by the consumer: the ``compressed-tensors``
package's own compressors decompress qkern's export to exactly ``dequantize_weight()`` and
re-compress qkern's weights to the same bytes; transformers (its compressed-tensors
integration) loads qkern's export and gives qkern's logits; checkpoints the package itself
compresses import into qkern to the package's own decompressed weights."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import qkern
from qkern.nn import QuantLinear, replace_linear

ct = pytest.importorskip("compressed_tensors", reason="the compressed-tensors package (the "
                         "consumer of this format) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers builds the models")
from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402
from compressed_tensors.utils.match import is_match  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import llm_models as LM  # noqa: E402

FMT = "compressed-tensors"
IDS = torch.tensor([[3, 17, 41, 5, 88, 23, 9, 60, 12, 31, 7, 2]])


def _swap(model, spec):
    """A copy of ``model`` with every Linear but lm_head a QuantLinear of ``spec``."""
    return replace_linear(model, spec, skip=["lm_head"])


def _quantized(kind: str, arch: str = "llama"):
    m = LM.build(arch)
    rtn = {"w4": (4, 32, True), "w4asym": (4, 32, False), "w8": (8, None, True),
           "w3asym": (3, 32, False), "w2": (2, 32, True)}
    if kind in rtn:
        b, g, sym = rtn[kind]
        return m, qkern.quantize_model(m, qkern.RTNConfig(bits=b, group_size=g, sym=sym))
    specs = {
        "fp8": {"fmt": "fp8_e4m3", "group_size": None},
        "fp8g": {"fmt": "fp8_e4m3", "group_size": 32},
        "w8a8": {"fmt": "int8", "group_size": None, "act": "int8_dynamic"},
        "w8a8t": {"fmt": "int8", "group_size": None, "act": "int8_dynamic_tensor"},
        "w8a8s": {"fmt": "int8", "group_size": None, "act": "int8_static", "act_scale": 0.02},
        "w4a8": {"fmt": "int4", "group_size": 32, "act": "int8_token"},
        "u4": {"fmt": "uint4", "group_size": 32, "symmetric": True},
    }
    return m, _swap(m, specs[kind])


def _qlayers(model) -> dict[str, QuantLinear]:
    return {n: x for n, x in model.named_modules() if isinstance(x, QuantLinear)}


def _ct_weights(folder, float_model) -> dict[str, torch.Tensor]:
    """Every quantized layer's weight as the compressed-tensors package decompresses it: its
    config groups parsed by its QuantizationScheme, its modules matched by its is_match, its
    format's compressor's decompress on the layer's tensors (read by safetensors)."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(folder / "model.safetensors"))
    out = {}
    for name, module in float_model.named_modules():
        for g in qc["config_groups"].values():
            scheme = QuantizationScheme.model_validate(g)
            if not is_match(name, module, scheme.targets, qc["ignore"]):
                continue
            local = {k[len(name) + 1:]: v for k, v in tensors.items()
                     if k.rpartition(".")[0] == name}
            comp = BaseCompressor.get_value_from_registry(g.get("format") or qc["format"])
            out[name] = comp.decompress(local, scheme)["weight"]
            break
    return out


@pytest.mark.parametrize("kind", ["w4", "w4asym", "w8", "w3asym", "w2", "fp8", "fp8g", "w8a8",
                                  "w8a8s", "w4a8", "u4"])
def test_package_decompresses_export_exactly(kind, tmp_path):
    m, q = _quantized(kind)
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    got = _ct_weights(out, m)
    layers = _qlayers(q)
    assert sorted(got) == sorted(layers)
    for name, layer in layers.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], layer.dequantize_weight()), name
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["ignore"] == ["lm_head"] and cfg["quantization_status"] == "compressed"
    # the package reads the whole config (its pydantic model forbids unknown keys)
    QuantizationConfig.model_validate(cfg)


@pytest.mark.parametrize("kind,preset", [("w4", "W4A16"), ("w4asym", "W4A16_ASYM"),
                                         ("w8", "W8A16"), ("w8a8", "W8A8")])
def test_package_compresses_qkern_weights_to_the_same_bytes(kind, preset, tmp_path):
    """The package's own compressor, given qkern's dequantized weight, scale and zero point,
    writes exactly the tensors qkern wrote (packing order, offsets, zero-point packing)."""
    _, q = _quantized(kind)
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    tensors = load_file(str(out / "model.safetensors"))
    scheme = QuantizationScheme.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
        ["config_groups"]["group_0"])
    ref = preset_name_to_scheme(preset, ["Linear"])
    for key in ("num_bits", "type", "symmetric"):
        assert getattr(scheme.weights, key) == getattr(ref.weights, key)
    assert (scheme.input_activations is None) == (ref.input_activations is None)
    for name, layer in _qlayers(q).items():
        qt = layer.quantized_weight()
        sd = {"weight": layer.dequantize_weight(),
              "weight_scale": qt.scale.reshape(qt.shape[0], -1)}
        if qt.zero_point is not None:
            sd["weight_zero_point"] = qt.zero_point.reshape(qt.shape[0], -1).to(torch.int8)
        comp = BaseCompressor.get_value_from_registry(scheme.format).compress(sd, scheme)
        mine = {k[len(name) + 1:]: v for k, v in tensors.items()
                if k.rpartition(".")[0] == name}
        assert sorted(comp) == sorted(mine), name
        for k in comp:
            assert torch.equal(comp[k], mine[k]), f"{name}.{k}"


@pytest.mark.parametrize("arch,kind", [
    *[("llama", k) for k in ("w4", "w4asym", "w3asym", "w8a8", "w8a8s", "fp8", "w4a8")],
    ("qwen2", "w4asym"), ("qwen2", "w8a8"), ("opt", "w4"), ("opt", "w8")])
def test_round_trip_same_logits(arch, kind, tmp_path):
    _, q = _quantized(kind, arch)
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    r = qkern.from_pretrained(out)  # detected from config.json
    a, b = _qlayers(q), _qlayers(r)
    assert sorted(a) == sorted(b)
    for n in a:
        assert b[n].kernel == a[n].kernel and b[n].act == a[n].act, n
        assert torch.equal(b[n].dequantize_weight(), a[n].dequantize_weight()), n
    assert torch.equal(LM.output(r, IDS), LM.output(q, IDS))


def test_bytelm_round_trip_and_transformers(tmp_path):
    from qkern.models import load_pretrained
    from qkern.models.assets import shipped_path
    model = load_pretrained(shipped_path("models/wikitext-bytelm"))
    ids = torch.tensor([list(b"The quick brown fox jumps over the lazy dog.")])
    for sym in (False, True):
        q = qkern.quantize_model(model, qkern.RTNConfig(bits=4, group_size=32, sym=sym))
        out = qkern.export(q, tmp_path / f"ct{sym}", format=FMT)
        r = qkern.from_pretrained(out)
        want = LM.output(q, ids)
        assert torch.equal(LM.output(r, ids), want)
        assert {x.kernel for x in _qlayers(r).values()} == {"w4_exact"}
    t = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert (LM.output(t, ids) - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("kind", ["w4", "w8", "w2", "fp8", "fp8g"])
def test_transformers_loads_export_with_qkern_logits(kind, tmp_path):
    """transformers' compressed-tensors integration (AutoModelForCausalLM.from_pretrained)
    decompresses qkern's export with the package and runs it in float32: qkern's logits up to
    float32 summation order."""
    _, q = _quantized(kind)
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    t = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    want = LM.output(q, IDS)
    got = LM.output(t, IDS)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6
    for name, layer in _qlayers(q).items():  # decompressed on the first forward
        assert torch.equal(t.get_submodule(name).weight, layer.dequantize_weight()), name


def test_transformers_w8a8_weights_exact_activations_differ(tmp_path):
    """W8A8: transformers' weights are qkern's exactly; its reference activation quantizer
    (compressed-tensors' fake quant: per-token scale amax / 127.5, codes in [-128, 127]) is
    not vLLM's / qkern's (amax / 127, codes in [-127, 127]), so the logits agree only
    within the activation rounding."""
    _, q = _quantized("w8a8")
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    t = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    want, got = LM.output(q, IDS), LM.output(t, IDS)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
    for name, layer in _qlayers(q).items():
        assert torch.equal(t.get_submodule(name).weight, layer.dequantize_weight()), name


def _ct_checkpoint(path, scheme: QuantizationScheme, arch: str = "llama", shard: str = "5GB"):
    """A checkpoint written by the compressed-tensors package itself: its scheme applied to
    a tiny model, scales / zero points from its calculate_qparams (min-max), compressed by
    its ModelCompressor and saved as llm-compressor does."""
    m = LM.build(arch)
    apply_quantization_config(m, QuantizationConfig(config_groups={"group_0": scheme},
                                                    ignore=["lm_head"]))
    for mod in m.modules():
        if not hasattr(mod, "weight_scale"):
            continue
        a, w = scheme.weights, mod.weight.data
        if a.strategy == "group":
            wg = w.reshape(w.shape[0], -1, a.group_size)
            mn, mx = wg.amin(-1), wg.amax(-1)
        else:
            mn, mx = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        s, z = calculate_qparams(mn, mx, a)
        mod.weight_scale.data = s.to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape)
        if hasattr(mod, "weight_zero_point"):
            mod.weight_zero_point.data = z.to(mod.weight_zero_point.dtype).reshape(
                mod.weight_zero_point.shape)
    comp = ModelCompressor.from_pretrained_model(m)
    comp.compress_model(m)
    m.save_pretrained(str(path), max_shard_size=shard)
    comp.update_config(str(path))
    return LM.build(arch)


def _scheme(preset: str, group_size: int | None = 32) -> QuantizationScheme:
    s = preset_name_to_scheme(preset, ["Linear"])
    if s.weights.strategy == "group":
        s.weights.group_size = group_size
    return s


@pytest.mark.parametrize("preset,kernel,act", [
    ("W4A16", "w4_exact", "none"), ("W4A16_ASYM", "w4_exact", "none"),
    ("W8A16", "dequant", "none"), ("W8A8", "w8a8", "int8_dynamic"),
    ("W3A16", "w23_exact", "none"), ("W4A8", "a8_token", "int8_token")])
def test_import_package_checkpoint(preset, kernel, act, tmp_path):
    """A checkpoint the package compresses imports onto qkern's kernels with exactly the
    weights the package's own decompressor gives."""
    float_model = _ct_checkpoint(tmp_path / "ct", _scheme(preset))
    want = _ct_weights(tmp_path / "ct", float_model)
    r = qkern.from_pretrained(tmp_path / "ct")
    layers = _qlayers(r)
    assert sorted(layers) == sorted(want)
    for n, layer in layers.items():
        assert layer.kernel == kernel and layer.act == act, (n, layer.kernel, layer.act)
        assert torch.equal(layer.dequantize_weight(), want[n].float()), n


def test_import_per_channel_int8_and_fp8_from_package(tmp_path):
    """Per-channel schemes land on the per-channel kernels (w8a16, fp8)."""
    for preset, kernel in (("W8A16", "w8a16"), ("FP8_DYNAMIC", "fp8")):
        s = preset_name_to_scheme(preset, ["Linear"])
        s.weights.strategy, s.weights.group_size = "channel", None
        if preset == "FP8_DYNAMIC":
            with pytest.raises(ValueError, match="ignore_activations"):
                float_model = _ct_checkpoint(tmp_path / preset, s)
                qkern.from_pretrained(tmp_path / preset)
            r = qkern.from_pretrained(tmp_path / preset, ignore_activations=True)
        else:
            float_model = _ct_checkpoint(tmp_path / preset, s)
            r = qkern.from_pretrained(tmp_path / preset)
        want = _ct_weights(tmp_path / preset, float_model)
        for n, layer in _qlayers(r).items():
            assert layer.kernel == kernel, (n, layer.kernel)
            assert torch.equal(layer.dequantize_weight(), want[n].float()), n


def test_import_sharded_package_checkpoint(tmp_path):
    float_model = _ct_checkpoint(tmp_path / "ct", _scheme("W4A16"), shard="40KB")
    assert (tmp_path / "ct" / "model.safetensors.index.json").is_file()
    want = _ct_weights_sharded(tmp_path / "ct", float_model)
    for n, layer in _qlayers(qkern.from_pretrained(tmp_path / "ct")).items():
        assert torch.equal(layer.dequantize_weight(), want[n]), n


def _ct_weights_sharded(folder, float_model):
    """_ct_weights over a sharded folder: the shards merged into one file first."""
    from safetensors.torch import save_file
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    merged = {}
    for f in set(index["weight_map"].values()):
        merged.update(load_file(str(folder / f)))
    flat = folder.parent / "merged"
    flat.mkdir()
    save_file(merged, str(flat / "model.safetensors"))
    (flat / "config.json").write_text((folder / "config.json").read_text())
    return _ct_weights(flat, float_model)


def test_import_fast_mode(tmp_path):
    _, q = _quantized("w4")
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    r = qkern.from_pretrained(out, mode="fast")
    assert {x.kernel for x in _qlayers(r).values()} == {"w4_fast"}
    with pytest.raises(ValueError, match="mode must be one of"):
        qkern.from_pretrained(out, mode="quick")


def test_detect_only_compressed_tensors_folders(tmp_path):
    from qkern.interop.compressed_tensors import CompressedTensors
    LM.build("llama").save_pretrained(str(tmp_path / "plain"))
    assert not CompressedTensors().detect(tmp_path / "plain")
    assert not CompressedTensors().detect(tmp_path)
    with pytest.raises(ValueError, match="not a compressed-tensors checkpoint"):
        qkern.from_pretrained(tmp_path / "plain", format=FMT)


def test_import_package_checkpoint_logits_match_transformers(tmp_path):
    """The package's W4A16 checkpoint: qkern's import and transformers' load give the same
    logits (float32 summation order)."""
    _ct_checkpoint(tmp_path / "ct", _scheme("W4A16"))
    t = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"),
                                                          dtype=torch.float32)
    want = LM.output(t, IDS)
    got = LM.output(qkern.from_pretrained(tmp_path / "ct"), IDS)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6


def test_mixed_schemes_get_one_group_each(tmp_path):
    """int4 sym + asym (pack-quantized), W8A8 (int-quantized), fp8 (naive-quantized): one
    config group each, top-level format "mixed-precision"; the package and qkern's import
    read it."""
    m = LM.build("llama")

    def spec(name, lin):
        if "mlp" in name:
            return {"fmt": "int8", "group_size": None, "act": "int8_dynamic"}
        if "o_proj" in name:
            return {"fmt": "fp8_e4m3", "group_size": None}
        return {"fmt": "int4", "group_size": 32, "symmetric": "q_proj" not in name}

    q = replace_linear(m, spec, skip=["lm_head"])
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    assert sorted(g["format"] for g in qc["config_groups"].values()) == [
        "int-quantized", "naive-quantized", "pack-quantized", "pack-quantized"]
    got = _ct_weights(out, m)
    for n, layer in _qlayers(q).items():
        assert torch.equal(got[n], layer.dequantize_weight()), n
    assert torch.equal(LM.output(qkern.from_pretrained(out), IDS), LM.output(q, IDS))


def test_half_precision_scales_rounded_within_bound(tmp_path):
    """dtype="bfloat16": each scale rounded to nearest bfloat16, so each weight (q - z) * s
    moves by at most 2^-8 of itself; the package decompresses to exactly those weights
    (its product then rounded to bfloat16, as it computes in the scale's dtype)."""
    _, q = _quantized("w4asym")
    out = qkern.export(q, tmp_path / "ct", format=FMT, dtype="bfloat16")
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    got = _ct_weights(out, LM.build("llama"))
    for n, layer in _qlayers(q).items():
        qt = layer.quantized_weight()
        s16 = tensors[f"{n}.weight_scale"]
        assert s16.dtype == torch.bfloat16
        assert torch.equal(s16, qt.scale.to(torch.bfloat16))
        ints = (qt.codes.float() - qt.zero_point.float().repeat_interleave(32, 1))
        rounded = ints * s16.float().repeat_interleave(32, 1)  # exact in float32
        w = layer.dequantize_weight()
        assert bool(((rounded - w).abs() <= 2.0 ** -8 * w.abs()).all()), n
        assert torch.equal(got[n], rounded.to(torch.bfloat16)), n
    with pytest.raises(ValueError, match="dtype must be one of"):
        qkern.export(q, tmp_path / "x", format=FMT, dtype="int8")
    tiny = LM.build("llama")
    with torch.no_grad():
        for p in tiny.model.layers.parameters():
            p.mul_(1e-5)  # scales ~1e-7: float16 subnormals, more than 2^-11 off
    qt = qkern.quantize_model(tiny, qkern.RTNConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="does not survive rounding to torch.float16"):
        qkern.export(qt, tmp_path / "x", format=FMT, dtype="float16")
    assert not (tmp_path / "x").exists()


def test_export_refusals_name_the_layer(tmp_path):
    m = LM.build("llama")
    for spec, why in (({"fmt": "nf4", "group_size": 64}, "nf4"),
                      ({"fmt": "fp8_e5m2", "group_size": None}, "fp8_e5m2")):
        q = _swap(m, spec)
        with pytest.raises(ValueError, match=rf"model.layers.0.self_attn.q_proj: .*{why}"):
            qkern.export(q, tmp_path / "x", format=FMT)
    hqq = qkern.quantize_model(m, qkern.HQQConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="float zero points"):
        qkern.export(hqq, tmp_path / "x", format=FMT)
    mixed = _swap(m, {"fmt": "int8", "group_size": None, "act": "int8_mixed", "threshold": 6.0})
    with pytest.raises(ValueError, match="int8_mixed"):
        qkern.export(mixed, tmp_path / "x", format=FMT)
    with pytest.raises(ValueError, match="no quantized layers"):
        qkern.export(m, tmp_path / "x", format=FMT)
    plain = torch.nn.Sequential(QuantLinear.from_float(torch.nn.Linear(64, 8), "int4",
                                                       group_size=32))
    with pytest.raises(ValueError, match="transformers model"):
        qkern.export(plain, tmp_path / "x", format=FMT)
    assert not (tmp_path / "x").exists()
    _, q = _quantized("w4")
    before = copy.deepcopy(q.state_dict())
    qkern.export(q, tmp_path / "ok", format=FMT)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # not modified
    with pytest.raises(FileExistsError):
        qkern.export(q, tmp_path / "ok", format=FMT)
    qkern.export(q, tmp_path / "ok", format=FMT, overwrite=True)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if k in ("weights", "input_activations"):
            group = cfg["quantization_config"]["config_groups"]["group_0"]
            group[k] = {**(group.get(k) or {}), **v}
        else:
            cfg["quantization_config"][k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,match", [
    ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity"),
    ({"transform_config": {"config_groups": {"u": {}}}}, "transforms"),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "KV-cache"),
    ({"quantization_status": "frozen"}, "float"),
    ({"format": "nvfp4-pack-quantized"}, "nvfp4"),
    ({"weights": {"actorder": "group"}}, "g_idx"),
    ({"weights": {"dynamic": True}}, "dynamic"),
    ({"input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                            "strategy": "tensor", "dynamic": True}},
     "q_proj: qkern cannot run this scheme: act='int8_dynamic_tensor' needs int8 weights"),
    ({"input_activations": {"num_bits": 8, "type": "int", "symmetric": False,
                            "strategy": "token", "dynamic": True}}, "ignore_activations"),
])
def test_import_refusals(change, match, tmp_path):
    _, q = _quantized("w4")
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]["config_groups"]["group_0"]["format"]
    (out / "config.json").write_text(json.dumps(cfg))
    _edit_config(out, **change)
    with pytest.raises(ValueError, match=match):
        qkern.from_pretrained(out)


def test_import_refuses_truncated_tensors(tmp_path):
    from safetensors.torch import save_file
    _, q = _quantized("w4asym")
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    t = load_file(str(out / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight_packed"] = \
        t["model.layers.0.self_attn.q_proj.weight_packed"][:, :-1].contiguous()
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="q_proj: weight_packed"):
        qkern.from_pretrained(out)
    del t["model.layers.0.self_attn.q_proj.weight_packed"]
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="weight_packed' is missing"):
        qkern.from_pretrained(out)


def _legacy_pack(u: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """compressed-tensors < 0.18 pack_to_int32 as its source specifies it: ``32 // bits``
    unsigned codes per int32 word, code j at bit (j % per) * bits of word j // per (numpy)."""
    a = u.movedim(dim, -1).numpy().astype(np.uint64)
    per = 32 // bits
    words = -(-a.shape[-1] // per)
    a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, words * per - a.shape[-1])])
    shifts = (np.arange(per, dtype=np.uint64) * bits)
    w = (a.reshape(*a.shape[:-1], words, per) << shifts).sum(-1).astype(np.uint32)
    return torch.from_numpy(w.view(np.int32)).movedim(-1, dim).contiguous()


def test_import_legacy_packing_before_0_18(tmp_path):
    """3-bit codes: compressed-tensors before 0.18 put 10 per word (2 bits unused); a
    checkpoint whose config says version 0.17 is read that way, to the same weights."""
    from safetensors.torch import save_file
    _, q = _quantized("w3asym")
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    t = load_file(str(out / "model.safetensors"))
    for n, layer in _qlayers(q).items():
        qt = layer.quantized_weight()  # int3 codes and zero points in [-4, 3]
        t[f"{n}.weight_packed"] = _legacy_pack((qt.codes.to(torch.int16) + 4), 3, 1)
        t[f"{n}.weight_zero_point"] = _legacy_pack(qt.zero_point.to(torch.int16) + 4, 3, 0)
    save_file(t, str(out / "model.safetensors"))
    _edit_config(out, version="0.17.1")
    r = qkern.from_pretrained(out)
    for n, layer in _qlayers(q).items():
        assert torch.equal(_qlayers(r)[n].dequantize_weight(), layer.dequantize_weight()), n
    _edit_config(out, version="0.20.1")  # read as dense: the word count is wrong
    with pytest.raises(ValueError, match="weight_packed"):
        qkern.from_pretrained(out)


@pytest.mark.parametrize("arch", ["tied-llama", "bert"])
def test_tied_and_encoder_models(arch, tmp_path):
    if arch == "bert":
        m = LM.build("bert")
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=LM.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    q = qkern.quantize_model(m, qkern.RTNConfig(bits=4, group_size=32))
    out = qkern.export(q, tmp_path / "ct", format=FMT)
    want = LM.output(q, IDS)
    assert torch.equal(LM.output(qkern.from_pretrained(out), IDS), want)
    cls = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    got = LM.output(cls.from_pretrained(str(out), dtype=torch.float32), IDS)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_gpt2_conv1d_refused(tmp_path):
    q = qkern.quantize_model(LM.build("gpt2"), qkern.RTNConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn: transformers builds "
                                         "it as Conv1D"):
        qkern.export(q, tmp_path / "ct", format=FMT)
