"""qkern.export(format="onnx"): QDQ graphs checked by their consumer, onnxruntime.

Each exported file passes ``onnx.checker`` (full check), holds the QuantizeLinear /
DequantizeLinear nodes counted below with the weight codes stored as integer initializers, and
onnxruntime runs it to qkern's own outputs: the activation codes onnxruntime computes (every
QuantizeLinear output, read from the running session) are compared with codes computed here in
numpy from qkern's definition (docs/numerics.md: ``clamp(rne(x * (1/s)) + zp)``, W8A8 codes in
[-127, 127], per-row scales ``max|x| / 127``) on the inputs qkern's layers saw, and the model
outputs with qkern's forward pass.

onnxruntime is run with ``session.disable_quant_qdq=1`` (the graph computed as written, with
its float ops) unless a test says otherwise: by default its QDQ optimizer rewrites the graph into
its own integer kernels (QGemm, QLinearConv, int32-quantized biases, MatMulNBits with int8
activations), a different arithmetic, checked with a looser tolerance.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="the ONNX consumer, onnxruntime, is not installed")
pytest.importorskip("sklearn", reason="the digits models need scikit-learn")

import qkern  # noqa: E402
from onnx_check import AS_WRITTEN, compare_codes, export, qkern_codes, session  # noqa: E402
from qkern.interop.onnx import count_ops  # noqa: E402
from qkern.models import digits as D  # noqa: E402
from qkern.nn import QuantLinear  # noqa: E402

INT8, INT4 = onnx.TensorProto.INT8, onnx.TensorProto.INT4

# ---- digits MLP / CNN ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return D.load_data()


@pytest.fixture(scope="module")
def floats(data):
    return {kind: D.train(kind, data, epochs=3) for kind in ("mlp", "cnn")}


SCHEMES = {
    "static": (qkern.StaticConfig(), True),  # (config, activations quantized)
    "static-uint8-asym": (qkern.StaticConfig(act_fmt="uint8", act_symmetric=False), True),
    "static-per-tensor": (qkern.StaticConfig(per_tensor=True), True),
    "dynamic": (qkern.DynamicConfig(), True),
    "w4-g32": (qkern.WeightOnlyConfig(fmt="int4", group_size=32), False),
    "w4-g16-asym": (qkern.WeightOnlyConfig(fmt="int4", group_size=16, symmetric=False), False),
    "a8-only": (qkern.ActivationOnlyConfig(act_fmt="uint8"), True),
}
CASES = [(k, s) for k in ("mlp", "cnn") for s in SCHEMES if not (k == "cnn" and s == "dynamic")]


def quantized(floats, data, kind, scheme):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qkern.quantize_model(floats[kind], SCHEMES[scheme][0],
                                    calibration=list(data.x_calib.split(64)))


@pytest.mark.parametrize("kind,scheme", CASES)
def test_digits_onnxruntime_matches_qkern(kind, scheme, data, floats, tmp_path):
    q = quantized(floats, data, kind, scheme)
    proto = export(q, tmp_path, example_inputs=(data.x_test[:4],))
    ops = count_ops(proto)
    layers = 3 if kind == "mlp" else 4
    acts = SCHEMES[scheme][1]
    weights = 0 if scheme == "a8-only" else layers
    assert ops.get("QuantizeLinear", 0) == (layers if acts else 0), ops
    assert ops.get("DequantizeLinear", 0) == (layers if acts else 0) + weights, ops
    assert ops.get("MatMul", 0) + ops.get("Gemm", 0) + ops.get("Conv", 0) >= layers

    x = data.x_test  # 449 held-out images, traced with 4: the batch dimension is dynamic
    with torch.no_grad():
        ref = q(x).numpy()
    outs = session(proto, AS_WRITTEN, extra_outputs=True).run(None, {"input": x.numpy()})
    y = outs[0]
    assert y.shape == ref.shape
    if acts:  # onnxruntime's activation codes are qkern's
        same, worst = compare_codes(qkern_codes(q, {"input": x}), outs[1:])
        assert same >= 0.999 and worst <= 1, (same, worst)
    # equal codes leave float32 summation order: 1e-6 relative; a code one step off in a
    # hidden layer (a near-tie decided differently after that) moves logits by ~1e-3 of max
    tol = (2e-6 if not acts else 2e-2) * float(np.abs(ref).max())
    assert np.abs(y - ref).max() <= tol, (np.abs(y - ref).max(), tol)
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_digits_default_onnxruntime_session(kind, data, floats, tmp_path):
    """onnxruntime's own QDQ optimizations (QGemm / QLinearConv, biases rounded to int32 at
    scale s_x * s_w) compute the W8A8 model in its integer arithmetic: the same predictions,
    logits within 2 % of their range (measured: 0.2 % MLP, 0.9 % CNN)."""
    q = quantized(floats, data, kind, "static")
    proto = export(q, tmp_path, example_inputs=(data.x_test[:4],))
    with torch.no_grad():
        ref = q(data.x_test).numpy()
    y = session(proto, {}).run(None, {"input": data.x_test.numpy()})[0]
    assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max()
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.99


def _initializers(proto):
    return {t.name: t for t in proto.graph.initializer}


@pytest.mark.parametrize("scheme,elem,block", [("static", INT8, None), ("w4-g16-asym", INT4, 16)])
def test_weight_codes_are_the_initializers(scheme, elem, block, data, floats, tmp_path):
    """The weights are qkern's codes, scales and zero points, read back with onnx's own
    numpy_helper (4-bit codes unpacked by onnx), transposed to the (in, out) MatMul layout."""
    from onnx import numpy_helper

    q = quantized(floats, data, "mlp", scheme)
    proto = export(q, tmp_path, example_inputs=(data.x_test[:2],))
    inits = _initializers(proto)
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
           and n.input[0] in inits and inits[n.input[0]].data_type == elem]
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(dqs) == len(layers) == 3
    for node, layer in zip(dqs, layers):
        qt = layer.quantized_weight()
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        codes = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
        scale = numpy_helper.to_array(inits[node.input[1]])
        np.testing.assert_array_equal(codes, qt.codes.numpy().astype(np.int64).T)
        if block is None:
            assert attrs.get("axis") == 1 and "block_size" not in attrs
            np.testing.assert_array_equal(scale, qt.scale.numpy().reshape(-1))
            assert len(node.input) == 2  # symmetric: no zero point
        else:
            assert attrs.get("axis") == 0 and attrs.get("block_size") == block
            np.testing.assert_array_equal(scale, qt.scale.numpy().T)
            zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64)
            assert inits[node.input[2]].data_type == elem
            np.testing.assert_array_equal(zp, qt.zero_point.numpy().astype(np.int64).T)
