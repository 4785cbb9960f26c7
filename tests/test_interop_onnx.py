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
from torch import nn

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
ort = pytest.importorskip("onnxruntime", reason="the ONNX consumer, onnxruntime, is not installed")
pytest.importorskip("sklearn", reason="the digits models need scikit-learn")

import qkern  # noqa: E402
from onnx_check import AS_WRITTEN, compare_codes, export, qkern_codes, session  # noqa: E402
from qkern.interop.onnx import count_ops  # noqa: E402
from qkern.models import digits as D  # noqa: E402
from qkern.nn import QuantLinear  # noqa: E402
from qkern.quantization import ActQuant  # noqa: E402

INT8, INT4, F8 = onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN

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
    "fp8-e4m3": (qkern.WeightOnlyConfig(fmt="fp8_e4m3", group_size=None), False),
    "mxfp8-e4m3": (qkern.WeightOnlyConfig(fmt="mxfp8_e4m3", group_size=32), False),  # E8M0
}
CASES = [(k, s) for k in ("mlp", "cnn") for s in SCHEMES
         if k == "mlp" or s in ("static", "static-uint8-asym", "w4-g16-asym", "a8-only")]


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


@pytest.mark.parametrize("scheme,elem,block", [("static", INT8, None), ("w4-g16-asym", INT4, 16),
                                               ("mxfp8-e4m3", F8, 32)])
def test_weight_codes_are_the_initializers(scheme, elem, block, data, floats, tmp_path):
    """The weights are qkern's codes, scales and zero points, read back with onnx's own
    numpy_helper (4-bit codes unpacked by onnx; float8 codes compared as bytes), transposed to
    the (in, out) MatMul layout."""
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
        codes = numpy_helper.to_array(inits[node.input[0]])
        codes = codes.view(np.uint8) if elem == F8 else codes.astype(np.int64)
        scale = numpy_helper.to_array(inits[node.input[1]])
        ref = qt.codes.numpy()
        np.testing.assert_array_equal(codes, (ref if elem == F8 else ref.astype(np.int64)).T)
        if block is None:
            assert attrs.get("axis") == 1 and "block_size" not in attrs
            np.testing.assert_array_equal(scale, qt.scale.numpy().reshape(-1))
            assert len(node.input) == 2  # symmetric: no zero point
        else:
            assert attrs.get("axis") == 0 and attrs.get("block_size") == block
            np.testing.assert_array_equal(scale, qt.scale.numpy().T)
            if qt.zero_point is None:
                assert len(node.input) == 2
                continue
            zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64)
            assert inits[node.input[2]].data_type == elem
            np.testing.assert_array_equal(zp, qt.zero_point.numpy().astype(np.int64).T)


# ---- what cannot be exported, files, options -----------------------------------------------


def test_refusals_name_the_layer_and_the_reason(data, floats, tmp_path):
    x = (data.x_test[:2],)
    mlp, cnn = floats["mlp"], floats["cnn"]
    cases = [
        (qkern.WeightOnlyConfig(fmt="nf4", group_size=16), mlp, "1: format nf4 is a codebook"),
        (qkern.LLMInt8Config(), mlp, "3: act='int8_mixed' has no QDQ form"),
        (qkern.DynamicConfig(), cnn, "0: act='int8_dynamic' on a convolution"),
    ]
    for cfg, model, needle in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = qkern.quantize_model(model, cfg, calibration=list(data.x_calib.split(64)))
        with pytest.raises(ValueError, match="cannot express these layers") as e:
            qkern.export(q, tmp_path / "m.onnx", format="onnx", example_inputs=x)
        assert needle in str(e.value), str(e.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = nn.Sequential(nn.Flatten(), QuantLinear.from_float(nn.Linear(64, 8), "int4",
                                                                  group_size=32, mode="fast"))
    with pytest.raises(ValueError, match="1: mode='fast'"):
        qkern.export(fast, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    dyn_w = nn.Sequential(qkern.nn.DynamicWeightLinear.from_float(nn.Linear(64, 8)),
                          QuantLinear.from_float(nn.Linear(8, 4), "int8", group_size=None))
    with pytest.raises(ValueError, match="0: DynamicWeightLinear has no ONNX QDQ export"):
        qkern.export(dyn_w, tmp_path / "m.onnx", format="onnx", example_inputs=(torch.ones(1, 64),))
    half = nn.Sequential(QuantLinear.from_float(nn.Linear(64, 8), "int8", group_size=None),
                         nn.Linear(8, 4).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"1.weight: torch.bfloat16 \(the QDQ graph computes"):
        qkern.export(half, tmp_path / "m.onnx", format="onnx", example_inputs=(torch.ones(1, 64),))
    w4 = quantized(floats, data, "mlp", "w4-g32")
    with pytest.raises(ValueError, match="group-wise scales need opset >= 21"):
        qkern.export(w4, tmp_path / "m.onnx", format="onnx", example_inputs=x, opset=17)
    with pytest.raises(ValueError, match="no quantized layers"):
        qkern.export(mlp, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_inputs_files_and_the_model_left_alone(data, floats, tmp_path):
    q = quantized(floats, data, "mlp", "static")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    types = [type(m) for m in q.modules()]
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="example_inputs"):
        qkern.export(q, out, format="onnx")
    with pytest.raises(TypeError, match="must all be tensors"):
        qkern.export(q, out, format="onnx", example_inputs=(data.x_test[:2].numpy(),))
    with pytest.raises(ValueError, match="not parameters"):
        qkern.export(q, out, format="onnx", example_inputs={"x": data.x_test[:2]})
    with pytest.raises(ValueError, match="opset"):
        qkern.export(q, out, format="onnx", example_inputs=(data.x_test[:2],), opset=22)
    with pytest.raises(FileNotFoundError):
        qkern.export(q, tmp_path / "no" / "m.onnx", format="onnx",
                     example_inputs=(data.x_test[:2],))
    # opset 17: per-channel int8 weights and static activations need nothing newer
    path = qkern.export(q, out, format="onnx", example_inputs={"input": data.x_test[:2]},
                        opset=17, input_names=["pixels"], output_names=["logits"])
    assert path == out and out.is_file()
    proto = onnx.load(out)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    with torch.no_grad():
        ref = q(data.x_test).numpy()
    y = session(proto, AS_WRITTEN).run(["logits"], {"pixels": data.x_test.numpy()})[0]
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    with pytest.raises(FileExistsError):
        qkern.export(q, out, format="onnx", example_inputs=(data.x_test[:2],))
    qkern.export(q, out, format="onnx", example_inputs=(data.x_test[:2],), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert [type(m) for m in q.modules()] == types


@pytest.mark.parametrize("rounding", ["onnx", "qkern"])
def test_rounding_ties_and_saturation(rounding, tmp_path):
    """Activations a rounding error away from half-integers of the step, and far outside the
    range: ONNX's QuantizeLinear divides (``x / s``), qkern multiplies by ``1/s``; with
    rounding="qkern" the graph quantizes ``x * (1/s)`` with scale 1 and every code is qkern's;
    with the standard pair some near-ties land one code away. Both saturate as qkern does:
    ActQuant int8 at -128, the W8A8 kernel at -127 (the exported Clip)."""
    torch.manual_seed(0)
    s = 0.1
    act_q = ActQuant(QuantLinear.from_float(nn.Linear(15, 8), "int8", group_size=None), "int8",
                     torch.tensor(s), None)
    w8a8 = QuantLinear.from_float(nn.Linear(64, 8), "int8", group_size=None, act="int8_static",
                                  act_scale=s)
    mid = nn.Linear(8, 64)
    with torch.no_grad():
        mid.weight.mul_(100.0)  # the saturated row's hidden values go far past +-12.7
    model = nn.Sequential(act_q, mid, w8a8)
    ties = ((torch.arange(-128, 127, dtype=torch.float32) + 0.5) * s).reshape(-1, 15)
    x = torch.cat([ties, torch.nextafter(ties, torch.full_like(ties, 1e9)),
                   torch.nextafter(ties, torch.full_like(ties, -1e9)), torch.full((1, 15), -1e3)])
    proto = export(model, tmp_path, example_inputs=(x[:2],), rounding=rounding)
    outs = session(proto, AS_WRITTEN, extra_outputs=True).run(None, {"input": x.numpy()})
    ours = qkern_codes(model, {"input": x})
    assert ours[0][-1].min() == -128 and ours[1][-1].min() == -127  # saturation, as qkern
    assert outs[1][-1].min() == -128 and outs[2][-1].min() == -127
    same, worst = compare_codes(ours[:1], outs[1:2])  # the first layer: identical inputs
    if rounding == "qkern":
        assert same == 1.0
        with torch.no_grad():
            ref = model(x).numpy()
        assert np.abs(outs[0] - ref).max() <= 1e-5 * np.abs(ref).max()
    else:
        assert 0.9 < same < 1.0 and worst == 1, same  # x / s, x * (1/s): some ties differ


@pytest.mark.parametrize("cfg", [
    qkern.StaticConfig(),  # W8A8 kernels on every layer
    qkern.StaticConfig(fmt="int4", group_size=4, act_fmt="uint8", act_symmetric=False),
], ids=["w8a8", "w4-g4-uint8-act"])
def test_conv1d_strides_dilation_groups(cfg, tmp_path):
    """QuantConv1d with stride, padding and dilation; group-wise weights dequantized blocked on
    the (out, in * k) matrix, then reshaped for Conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, stride=2), nn.ReLU(),
                          nn.Conv1d(8, 8, 5, dilation=2), nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(16, 4, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qkern.quantize_model(model, cfg, calibration=[x[:8]])
    proto = export(q, tmp_path, example_inputs=(x[:2],))
    ops = count_ops(proto)
    assert ops["Conv"] == 2 and ops["QuantizeLinear"] == 3 and ops["DequantizeLinear"] == 6
    assert ops.get("Reshape", 0) == (2 if cfg.group_size else 0)
    outs = session(proto, AS_WRITTEN, extra_outputs=True).run(None, {"input": x.numpy()})
    same, worst = compare_codes(qkern_codes(q, {"input": x}), outs[1:])
    assert same == 1.0, (same, worst)
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(outs[0] - ref).max() <= 1e-5 * np.abs(ref).max()


def test_equal_zero_points_shared_by_int4_and_int8_layers(tmp_path):
    """torch's exporter stores equal constants once (later uses through Identity): all-zero
    zero points of two int4 layers and an int8 layer are one tensor; the int4 layers get an
    INT4 copy and the int8 layer keeps its INT8 one."""
    from onnx import numpy_helper

    torch.manual_seed(0)

    def layer(fmt):
        w = torch.randn(64, 64)
        scale = w.abs().reshape(64, 4, 16).amax(-1) / 7
        q = qkern.quantize(w, fmt, granularity="group", axis=1, group_size=16, symmetric=False,
                           scale=scale, zero_point=torch.zeros(64, 4, dtype=torch.int32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # group-wise int8 / g16 int4: the dequant kernel
            return QuantLinear(q, torch.zeros(64))

    model = nn.Sequential(layer("int4"), nn.ReLU(), layer("int4"), nn.ReLU(), layer("int8"))
    x = torch.randn(8, 64)
    proto = export(model, tmp_path, example_inputs=(x[:2],))
    inits = {t.name: t for t in proto.graph.initializer}
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert [inits[n.input[2]].data_type for n in dqs] == [INT4, INT4, INT8]
    assert all(not numpy_helper.to_array(inits[n.input[2]]).any() for n in dqs)
    y = session(proto, AS_WRITTEN).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
