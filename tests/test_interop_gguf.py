"""GGUF export / import (qkern.interop.gguf), checked by the consumers: the gguf package's
GGUFReader and gguf.quants.dequantize read every exported tensor back to qkern's values
(bit-exactly where the type holds qkern's codes); llama.cpp (llama-cpp-python, skipped when
absent) loads the exported wikitext-bytelm, tokenizes bytes as the model does, and computes the
same logits as qkern within a stated tolerance; its own quantizer writes the same Q6_K bytes as
qkern's encoder. Imports are checked against files written here with the gguf package directly
(not by qkern), including ggml's negative Q4_0 scales."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

import qkern
from qkern.nn import QuantLinear

gguf = pytest.importorskip("gguf", reason="the gguf package reads and writes GGUF files")
from gguf.quants import dequantize as gq_dequantize  # noqa: E402
from gguf.quants import quantize as gq_quantize  # noqa: E402

GT = gguf.GGMLQuantizationType
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
           "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (q/k rows)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def tiny(seed: int = 0):
    import llm_models
    return llm_models.build("llama", seed)  # 2 layers, hidden 64, 4 heads, 2 kv heads


def fp16_scales(model):
    """A copy whose QuantLinear scales are rounded to fp16 (same codes)."""
    model = copy.deepcopy(model)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, QuantLinear):
                q = child.quantized_weight()
                setattr(mod, name, QuantLinear(replace(q, scale=q.scale.half().float()), None))
    return model


def read(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def values(t) -> np.ndarray:
    """A tensor as the gguf package decodes it, in numpy's (rows, cols) order."""
    return gq_dequantize(np.asarray(t.data), t.tensor_type).reshape(
        [int(s) for s in reversed(t.shape)])


def expected(model, hf: str, gg: str) -> np.ndarray:
    m = model.get_submodule(hf)
    w = (m.dequantize_weight() if isinstance(m, QuantLinear) else m.weight).detach().numpy()
    cfg = model.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    return permute(w, heads[gg]) if gg in heads else w


def export(model, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qkern.export(model, path, format="gguf", **kw)


@pytest.mark.parametrize("typ, config", [
    ("Q4_0", qkern.RTNConfig(bits=4, group_size=32, sym=True)),
    ("Q4_0", qkern.RTNConfig(bits=4, group_size=64, sym=True)),  # scale repeated per 32
    ("Q8_0", qkern.RTNConfig(bits=8, group_size=None)),  # per channel: d repeated per 32
])
def test_export_bit_exact_read_by_gguf(tmp_path, typ, config):
    model = tiny()
    qm = fp16_scales(qkern.quantize_model(model, config))
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no warning
        out = qkern.export(qm, tmp_path / "m.gguf", format="gguf", type=typ, exact=True,
                           vocab="none")
    assert all(torch.equal(before[k], v) for k, v in qm.state_dict().items())
    fields, tensors = read(out)
    cfg = qm.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.num_hidden_layers
    assert fields["llama.embedding_length"] == cfg.hidden_size
    assert fields["llama.feed_forward_length"] == cfg.intermediate_size
    assert fields["llama.attention.head_count"] == cfg.num_attention_heads
    assert fields["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    assert fields["llama.context_length"] == cfg.max_position_embeddings
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert fields["general.file_type"] == int(gguf.LlamaFileType["MOSTLY_" + typ])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in LINEARS.items():
            t = tensors[f"blk.{i}.{gg}.weight"]
            assert t.tensor_type == GT[typ]
            np.testing.assert_array_equal(values(t),
                                          expected(qm, f"model.layers.{i}.{hf}", gg))
        np.testing.assert_array_equal(values(tensors[f"blk.{i}.attn_norm.weight"]),
                                      qm.model.layers[i].input_layernorm.weight.detach())
    np.testing.assert_array_equal(values(tensors["token_embd.weight"]),
                                  qm.model.embed_tokens.weight.detach())
    np.testing.assert_array_equal(values(tensors["output.weight"]), qm.lm_head.weight.detach())
    assert tensors["output.weight"].tensor_type == GT.F32


def test_fp16_rounding_and_requantization_are_reported(tmp_path):
    qm = qkern.quantize_model(tiny(), qkern.RTNConfig(bits=4, group_size=32, sym=True))
    with pytest.raises(ValueError, match="fp16 scales"):
        qkern.export(qm, tmp_path / "a.gguf", format="gguf", type="Q4_0", exact=True,
                     vocab="none")
    assert not (tmp_path / "a.gguf").exists()  # nothing half-written
    with pytest.warns(UserWarning, match="fp16 scales"):
        out = qkern.export(qm, tmp_path / "a.gguf", format="gguf", type="Q4_0", vocab="none")
    _, tensors = read(out)
    layer = qm.model.layers[0].mlp.up_proj
    got = values(tensors["blk.0.ffn_up.weight"])
    q = layer.quantized_weight()  # same codes, scale rounded to fp16
    ref = q.codes.float().numpy() * np.repeat(q.scale.half().float().numpy(), 32, axis=1)
    np.testing.assert_array_equal(got, ref)
    # uint4 with zero points -> Q4_1 (value d * u + m): m = -d * z rounded to fp16 as well
    qa = qkern.quantize_model(tiny(), qkern.RTNConfig(bits=4, group_size=32, sym=False))
    with pytest.warns(UserWarning, match="fp16 scales"):
        out = qkern.export(qa, tmp_path / "c.gguf", format="gguf", type="Q4_1", vocab="none")
    q = qa.model.layers[1].mlp.down_proj.quantized_weight()  # int4 codes c, zero points z
    off = 8 if q.format.signed else 0  # Q4_1 stores u = c + 8 in [0, 15], zero point z + 8
    d = q.scale.half().float().numpy()
    m = (-d * (q.zero_point.numpy() + off)).astype(np.float16).astype(np.float32)
    ref = (q.codes.float().numpy() + off) * np.repeat(d, 32, axis=1) + np.repeat(m, 32, axis=1)
    np.testing.assert_array_equal(values(read(out)[1]["blk.1.ffn_down.weight"]), ref)
    # int3 has no GGUF type: requantized from qkern's dequantized weight with gguf's Q4_0 rule
    q3 = qkern.quantize_model(tiny(), qkern.RTNConfig(bits=3, group_size=32, sym=True))
    with pytest.warns(UserWarning, match="requantized"):
        out = qkern.export(q3, tmp_path / "b.gguf", format="gguf", type="Q4_0", vocab="none")
    w = q3.model.layers[0].mlp.up_proj.dequantize_weight().numpy()
    np.testing.assert_array_equal(values(read(out)[1]["blk.0.ffn_up.weight"]),
                                  gq_dequantize(gq_quantize(w, GT.Q4_0), GT.Q4_0))


@pytest.mark.parametrize("typ, rel", [("Q4_K", 0.09), ("Q6_K", 0.025), ("Q5_0", 0.05)])
def test_float_model_k_quants_decode_close(tmp_path, typ, rel):
    model = tiny()
    out = export(model, tmp_path / "f.gguf", type=typ, vocab="none")
    _, tensors = read(out)
    for i in range(2):
        for hf, gg in LINEARS.items():
            t = tensors[f"blk.{i}.{gg}.weight"]
            ref = expected(model, f"model.layers.{i}.{hf}", gg)
            k = ref.shape[1]  # K-quants need rows of 256: llama.cpp's fallbacks
            want = typ if typ == "Q5_0" or k % 256 == 0 else {"Q4_K": "Q5_0",
                                                               "Q6_K": "Q8_0"}[typ]
            assert t.tensor_type == GT[want]
            err = np.sqrt(((values(t) - ref) ** 2).mean() / (ref ** 2).mean())
            assert err < rel, (t.name, err)


def test_k_quant_encoders_within_half_a_step(rng):
    from qkern.interop.gguf_blocks import quantize_q4_k, quantize_q6_k
    x = rng.standard_normal((8, 512)).astype(np.float32) * np.float32(0.05)
    x[1] = 0
    x[2, :256] = 0.25  # constant block
    b6 = quantize_q6_k(x)
    assert b6.shape == (8, 2 * 210)
    v6 = gq_dequantize(b6, GT.Q6_K)
    blk = b6.reshape(-1, 210)
    step = (blk[:, 208:].copy().view(np.float16).astype(np.float32)
            * blk[:, 192:208].view(np.int8).astype(np.float32))  # d * sc per 16
    step = np.repeat(np.abs(step), 16, axis=1).reshape(x.shape)
    inside = np.abs(x) < 31 * step
    assert np.all(np.abs(v6 - x)[inside] <= step[inside] / 2 * (1 + 1e-5) + 1e-9)
    assert np.all(v6[1] == 0) and np.allclose(v6[2, :256], 0.25, rtol=1e-3)
    b4 = quantize_q4_k(x)
    assert b4.shape == (8, 2 * 144)
    v4 = gq_dequantize(b4, GT.Q4_K)
    assert np.all(v4[1] == 0) and np.allclose(v4[2, :256], 0.25, rtol=1e-2)
    err = np.sqrt(((v4 - x) ** 2).mean() / (x ** 2).mean())
    q40 = gq_dequantize(gq_quantize(x, GT.Q4_0), GT.Q4_0)
    assert err < np.sqrt(((q40 - x) ** 2).mean() / (x ** 2).mean())  # better than Q4_0


def test_import_exact_round_trip(tmp_path):
    qm = fp16_scales(qkern.quantize_model(tiny(), qkern.RTNConfig(bits=4, group_size=32)))
    out = export(qm, tmp_path / "m.gguf", type="Q4_0", exact=True, vocab="none")
    back = qkern.from_pretrained(out)  # detected by the GGUF magic
    layer = back.model.layers[1].self_attn.k_proj
    assert isinstance(layer, QuantLinear) and layer.kernel.startswith("w4")
    assert layer.weight_q.format.name == "int4" and layer.weight_q.group_size == 32
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(qm(ids).logits, back(ids).logits)
    again = export(back, tmp_path / "again.gguf", type="Q4_0", exact=True, vocab="none")
    assert again.read_bytes() == out.read_bytes()
    q8 = qkern.quantize_model(tiny(), qkern.RTNConfig(bits=8, group_size=None))
    back8 = qkern.from_pretrained(export(fp16_scales(q8), tmp_path / "q8.gguf", type="Q8_0",
                                         exact=True, vocab="none"))
    layer = back8.model.layers[0].self_attn.q_proj  # one d per row: per channel again
    assert layer.kernel == "w8a16" and layer.weight_q.granularity == "channel"
    torch.testing.assert_close(layer.dequantize_weight(), fp16_scales(q8).model.layers[0]
                               .self_attn.q_proj.dequantize_weight(), rtol=0, atol=0)
    own = qkern.from_pretrained(out, backend="qkern")  # qkern's Llama class
    with torch.no_grad():
        torch.testing.assert_close(own(ids), qm(ids).logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_biases_and_float_round_trip(tmp_path):
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, attention_bias=True)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias)
    out = export(model, tmp_path / "t.gguf", type="F32")  # vocab 256: the byte table
    fields, tensors = read(out)
    assert "output.weight" not in tensors and fields["tokenizer.ggml.model"] == "gpt2"
    np.testing.assert_array_equal(values(tensors["blk.0.attn_k.bias"]), permute(
        model.model.layers[0].self_attn.k_proj.bias.detach().numpy(), 1))
    back = qkern.from_pretrained(out)
    assert back.config.tie_word_embeddings
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def write_reference_gguf(path, model, qtype) -> None:
    """A GGUF written with the gguf package alone (no qkern): as convert_hf_to_gguf.py
    followed by llama.cpp's quantizer would (q/k permuted, linears in qtype)."""
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_tokenizer_model("none")
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf, gg in LINEARS.items():
            x = sd[p + hf + ".weight"]
            if gg in ("attn_q", "attn_k"):
                x = permute(x, cfg.num_attention_heads if gg == "attn_q"
                            else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", gq_quantize(x, qtype), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype, fmt", [(GT.Q4_0, "uint4"), (GT.Q8_0, "int8"),
                                        (GT.Q5_0, "uint5"), (GT.Q4_1, "uint4")])
def test_import_file_written_by_gguf(tmp_path, qtype, fmt):
    model = tiny(1)
    path = tmp_path / "ref.gguf"
    write_reference_gguf(path, model, qtype)
    _, tensors = read(path)
    if qtype == GT.Q4_1:  # min m = min(x): not a multiple of d, refused with the reason
        with pytest.raises(ValueError, match="not integer multiples of its scales"):
            qkern.from_pretrained(path)
        back = qkern.from_pretrained(path, unsupported="float")
        assert isinstance(back.model.layers[0].mlp.up_proj, torch.nn.Linear)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # int8 / uint5 groups of 32 run on "dequant"
            back = qkern.from_pretrained(path)
    for i in range(2):
        for hf, gg in LINEARS.items():
            m = back.get_submodule(f"model.layers.{i}.{hf}")
            if qtype != GT.Q4_1:  # ggml's Q4_0/Q5_0 d = max / -8: negative d -> uint codes
                assert m.weight_q.format.name == fmt, (hf, m.weight_q.format.name)
            got = (m.dequantize_weight() if isinstance(m, QuantLinear) else m.weight).detach()
            np.testing.assert_array_equal(expected(back, f"model.layers.{i}.{hf}", gg),
                                          values(tensors[f"blk.{i}.{gg}.weight"]))
            assert got.shape == (m.out_features, m.in_features)
    np.testing.assert_array_equal(back.lm_head.weight.detach(), model.lm_head.weight.detach())


def test_qkern_llama_and_transformers_llama_export_the_same(tmp_path):
    from qkern.models import load_llama, load_pretrained
    from qkern.models.assets import shipped_path
    p = shipped_path("models/wikitext-bytelm")
    a = read(export(load_llama(p), tmp_path / "a.gguf", type="Q8_0"))
    b = read(export(load_pretrained(p), tmp_path / "b.gguf", type="Q8_0"))
    assert a[0] == b[0] and list(a[1]) == list(b[1])
    for name, t in a[1].items():
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(b[1][name].data))
    tokens = a[0]["tokenizer.ggml.tokens"]  # GPT-2 byte -> unicode table, id = byte
    assert a[0]["tokenizer.ggml.model"] == "gpt2" and len(tokens) == 256
    assert tokens[ord("A")] == "A" and tokens[ord(" ")] == "\u0120" and len(set(tokens)) == 256


def test_bad_input(tmp_path):
    import llm_models
    model = tiny()
    with pytest.raises(ValueError, match="llama architecture"):
        export(llm_models.build("gpt2"), tmp_path / "g.gguf", vocab="none")
    with pytest.raises(ValueError, match="vocab='none'"):
        export(model, tmp_path / "v.gguf")  # vocabulary of 96: no byte table
    with pytest.raises(ValueError, match="type must be one of"):
        export(model, tmp_path / "t.gguf", type="Q3_K", vocab="none")
    with pytest.raises(ValueError, match="directory"):
        export(model, tmp_path, vocab="none")
    with pytest.raises(TypeError, match="unknown options"):
        export(model, tmp_path / "o.gguf", vocab="none", group_size=32)
    out = export(model, tmp_path / "m.gguf", type="F16", vocab="none")
    with pytest.raises(FileExistsError):
        export(model, out, vocab="none")
    export(model, out, vocab="none", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGML not really")
    with pytest.raises(ValueError, match="not a GGUF file"):
        qkern.from_pretrained(junk, format="gguf")
    with pytest.raises(ValueError, match="backend"):
        qkern.from_pretrained(out, backend="onnx")


# ---------------------------------------------------------------- llama.cpp, the consumer

def _bytelm_q4(tmp_path):
    from qkern.models import load_pretrained
    from qkern.models.assets import shipped_path
    model = load_pretrained(shipped_path("models/wikitext-bytelm"))
    qm = fp16_scales(qkern.quantize_model(model, qkern.RTNConfig(bits=4, group_size=32)))
    return model, qm, export(qm, tmp_path / "bytelm-q4_0.gguf", type="Q4_0", exact=True)


def test_llama_cpp_runs_the_export(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the GGUF consumer) "
                                    "is not installed")
    from qkern.models.assets import shipped_path
    _, qm, path = _bytelm_q4(tmp_path)
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, n_threads=1, logits_all=True,
                          verbose=False)
    text = "Caf\u00e9 \u2014 the 1990s:\n  it was".encode()
    assert llm.tokenize(text, add_bos=False) == list(text)  # token id = byte
    assert llm.detokenize(list(text)) == text
    ids = list(shipped_path("data/wikitext-2/wiki.test.tokens").read_bytes()[:128])
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)], dtype=np.float64)
    with torch.no_grad():
        ref = qm(torch.tensor([ids])).logits[0].double().numpy()
    # llama.cpp quantizes the activations to 8 bits inside its Q4_0 dot products
    assert np.abs(got - ref).max() < 0.5
    assert np.median(np.abs(got - ref).max(-1)) < 0.1

    def nll(lg):
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        return float((lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]).mean())
    assert abs(nll(got) - nll(ref)) < 0.01 * nll(ref)
    llm.reset()
    llm.eval(ids[:32])
    out = []
    for _ in range(8):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    with torch.no_grad():
        want = qm.generate(torch.tensor([ids[:32]]), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)[0, 32:].tolist()
    assert out == want


def test_llama_cpp_quantizer_agrees_with_qkern_encoders(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the GGUF consumer) "
                                    "is not installed")
    import ctypes

    from qkern.models import load_pretrained
    from qkern.models.assets import shipped_path
    model = load_pretrained(shipped_path("models/wikitext-bytelm"))
    f32 = export(model, tmp_path / "f32.gguf", type="F32")
    for typ, ftype in (("Q6_K", 18), ("Q4_K", 14), ("Q4_0", 2)):
        mine = read(export(model, tmp_path / f"{typ}.gguf", type=typ))[1]
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 1
        theirs_path = tmp_path / f"ll-{typ}.gguf"
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs_path).encode(),
                                              ctypes.byref(params)) == 0
        theirs = read(theirs_path)[1]
        same = total = 0
        for name, t in mine.items():
            u = theirs[name]
            if t.tensor_type != GT[typ] or u.tensor_type != t.tensor_type:
                continue  # llama.cpp's mixes give some tensors other types
            a = np.asarray(t.data).reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
            b = np.asarray(u.data).reshape(a.shape)
            same, total = same + int((a == b).all(1).sum()), total + len(a)
            va, vb = values(t), values(u)
            assert np.sqrt(((va - vb) ** 2).mean() / (vb ** 2).mean()) < 0.05, name
        assert total > 0
        # byte-identical on x86-64 (a compiler fusing ggml's multiply-adds could flip a rare
        # near-tie in the scale search)
        assert same / total >= 0.99, (typ, same, total)
        # llama.cpp's file imported: Q6_K / Q8_0 / Q4_0 (negative d) exactly; Q4_K refused
        if typ == "Q4_K":
            with pytest.raises(ValueError, match="Q4_K"):
                qkern.from_pretrained(theirs_path)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = qkern.from_pretrained(theirs_path)
        for name, t in theirs.items():
            if name.startswith("blk.") and name.rsplit(".", 2)[-2] in LINEARS.values():
                i, gg = int(name.split(".")[1]), name.split(".")[2]
                hf = {v: k for k, v in LINEARS.items()}[gg]
                assert isinstance(back.get_submodule(f"model.layers.{i}.{hf}"), QuantLinear)
                np.testing.assert_array_equal(expected(back, f"model.layers.{i}.{hf}", gg),
                                              values(t))
        assert isinstance(back.lm_head, QuantLinear)  # llama.cpp writes output as Q6_K
        np.testing.assert_array_equal(back.lm_head.dequantize_weight(),
                                      values(theirs["output.weight"]))
