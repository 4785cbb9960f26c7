"""QuantLinear and replace_linear: outputs against x @ dequantize(W).T + b computed by torch
from qkern.quantize's own dequantized weight (itself tested against the numpy references), the
user's model left untouched, and torch.compile(fullgraph=True)."""

import copy

import pytest
import torch
from torch import nn

import qkern
from qkern.nn import QuantEmbedding, QuantLinear, replace_linear

CASES = [
    ("int4", {"group_size": 128}),
    ("int4", {"group_size": 32, "symmetric": False}),
    ("int8", {"group_size": None}),
    ("int3", {"group_size": 64}),
    ("int2", {"group_size": 32, "symmetric": False}),
    ("nf4", {"group_size": 64}),
    ("nf4", {"group_size": 64, "double_quant": True}),
    ("fp4_e2m1", {"group_size": 32}),
    ("fp4_bnb", {"group_size": 64}),
    ("fp8_e4m3", {"group_size": None}),
    ("ternary", {"group_size": None}),
    ("binary", {"group_size": None}),
]


def _linear(k=256, n=48, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[3] = 0.0  # a zero row
        lin.weight[5] *= 50.0  # a large one
    return lin


def _reference_weight(lin, fmt, kw):
    kw = dict(kw)
    g = kw.pop("group_size")
    w = lin.weight.detach()
    if g is None and qkern.formats.get(fmt).block_size is None:
        return qkern.quantize(w, fmt, granularity="channel", axis=0, **kw).dequantize()
    g = g or qkern.formats.get(fmt).block_size
    return qkern.quantize(w, fmt, granularity="group", axis=1, group_size=g, **kw).dequantize()


@pytest.mark.parametrize("fmt,kw", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_forward_matches_dequantized_reference(fmt, kw, m):
    lin = _linear()
    ql = QuantLinear.from_float(lin, fmt, **kw)
    w = _reference_weight(lin, fmt, kw)
    torch.testing.assert_close(ql.dequantize_weight(), w, rtol=1e-6, atol=1e-6)
    x = torch.randn(m, lin.in_features) * 3
    ref = (x.double() @ w.double().T + lin.bias.double()).float()
    y = ql(x)
    assert y.shape == (m, lin.out_features) and y.dtype == torch.float32
    # exact-mode kernels: fp32 accumulation of K products
    bound = 4 * lin.in_features * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().T).max()
    assert (y - ref).abs().max() <= bound + 1e-6, ql.kernel


def test_leading_dims_and_half_precision_inputs():
    lin = _linear()
    ql = QuantLinear.from_float(lin, "int4", group_size=64)
    x = torch.randn(2, 3, lin.in_features)
    torch.testing.assert_close(ql(x), ql(x.reshape(6, -1)).reshape(2, 3, -1))
    for dt in (torch.bfloat16, torch.float16):
        y = ql(x.to(dt))
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), ql(x.to(dt).float()), rtol=1e-2, atol=1e-2)


def test_extra_repr_and_bad_input():
    lin = _linear()
    ql = QuantLinear.from_float(lin, "nf4", group_size=64)
    r = repr(ql)
    assert "format=nf4" in r and "group_size=64" in r and "bits_per_weight=4.500" in r
    with pytest.raises(ValueError, match="last dim 256"):
        ql(torch.randn(2, 255))
    with pytest.raises(ValueError, match="does not divide"):
        QuantLinear.from_float(nn.Linear(100, 8), "int4", group_size=64)
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(nn.Conv1d(2, 2, 1), "int4")
    with pytest.raises(ValueError, match="act"):
        QuantLinear.from_float(lin, "int4", act="int4_dynamic")


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.act = nn.GELU()
        self.down = nn.Linear(256, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


def test_replace_linear_copies_unless_inplace_and_honours_skip():
    torch.manual_seed(1)
    model = _Mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = replace_linear(model, {"fmt": "int4", "group_size": 64}, skip=["head"])
    assert isinstance(q.up, QuantLinear) and isinstance(q.down, QuantLinear)
    assert type(q.head) is nn.Linear
    assert all(type(m) is nn.Linear for m in (model.up, model.down, model.head))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(4, 128)
    ref = copy.deepcopy(model)  # the float model with the quantized weights put in
    with torch.no_grad():
        ref.up.weight.copy_(q.up.dequantize_weight())
        ref.down.weight.copy_(q.down.dequantize_weight())
    torch.testing.assert_close(q(x), ref(x), rtol=1e-4, atol=1e-4)
    same = replace_linear(model, lambda name, lin: None if name == "up" else {"fmt": "int8",
                                                                             "group_size": None},
                          inplace=True)
    assert same is model and type(model.up) is nn.Linear and isinstance(model.down, QuantLinear)


def test_torch_compile_fullgraph():
    torch.manual_seed(2)
    model = replace_linear(_Mlp(), {"fmt": "int4", "group_size": 64})
    model.head = QuantLinear.from_float(nn.Linear(128, 10), "nf4", group_size=64)
    x = torch.randn(3, 128)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)


def test_binary_xnor_activations():
    """act="binary": XNOR-Net, activations replaced by sign(x) * mean|x| per row (0 -> +1)."""
    lin = _linear(k=200, n=24, seed=3)
    ql = QuantLinear.from_float(lin, "binary", group_size=None, act="binary")
    assert ql.kernel == "binary_xnor"
    w = _reference_weight(lin, "binary", {"group_size": None})
    x = torch.randn(5, 200)
    x[1] = 0.0
    beta = x.double().abs().mean(1, keepdim=True)
    xb = torch.where(x < 0, -1.0, 1.0).double() * beta
    ref = (xb @ w.double().T + lin.bias.double()).float()
    torch.testing.assert_close(ql(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="binary weights"):
        QuantLinear.from_float(lin, "int4", group_size=40, act="binary")


@pytest.mark.parametrize("fmt,kw,block", [
    ("int4", {"group_size": 64, "mode": "fast"}, 32),  # x quantized per 32-block of K
    ("int8", {"group_size": None, "act": "int8_dynamic"}, None),  # x quantized per row
])
def test_quantized_activation_modes_within_their_bound(fmt, kw, block):
    lin = _linear(seed=4)
    ql = QuantLinear.from_float(lin, fmt, **kw)
    assert ql.kernel in ("w4_fast", "w8a8")
    w = ql.dequantize_weight().double()
    x = torch.randn(6, lin.in_features) * 2
    ref = x.double() @ w.T + lin.bias.double()
    xb = x.abs().view(6, -1, block or lin.in_features).amax(-1)  # per-block amax of x
    half_step = (xb / 127 / 2).repeat_interleave(block or lin.in_features, 1).double()
    bound = half_step @ w.abs().T  # |x - xq| <= step/2 elementwise
    bound += 1e-5 * (x.double().abs() @ w.abs().T) + 1e-5
    assert ((ql(x).double() - ref).abs() <= bound).all()


def test_quant_embedding_compiles_without_graph_breaks():
    emb = torch.nn.Embedding(64, 32)
    qe = QuantEmbedding.from_float(emb, "int4", group_size=32)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(qe, fullgraph=True, backend="eager")  # a graph break raises
    want = emb.weight.detach()[ids]  # the float rows, to within the int4 step
    got = compiled(ids)
    assert torch.equal(got, qe(ids))
    assert float((got - want).abs().max()) <= float(qe.dequantize_weight().sub(
        emb.weight.detach()).abs().max()) + 1e-7
    with pytest.raises(IndexError):
        qe(torch.tensor([64]))
