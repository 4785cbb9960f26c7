"""LLM.int8 (Dettmers et al. 2022): QuantLinear(act="int8_mixed") / qkern::gemm_w8a8_mixed /
LLMInt8Config against a numpy reference written from the paper's equations: vector-wise int8
(row-wise absmax of X over the non-outlier columns, row-wise absmax of W) plus the outlier
columns X[:, O] @ W_dq[:, O]^T in float (eq. 3 and 4)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.library import opcheck

import llm_models as LM
import qkern
from qkern.io.serialization import BadFile
from qkern.nn import QuantLinear
from qkern.ops import NonFiniteError
from qkern.ops.w8 import unpack_w8
from qkern.ops.w8mixed import gather_w8_columns

ISAS = ["scalar", "avx2"]
OPS = torch.ops.qkern


# ---- the reference (numpy, float32 steps as the paper's vector-wise quantization) ----------

def ref_weight(w: np.ndarray):
    """Row-wise absmax int8 weight: s_w = max_k |W[n, k]| / 127, codes rne(W / s_w)."""
    w = np.asarray(w, np.float32)
    sw = (np.abs(w).max(1) / np.float32(127)).astype(np.float32)
    sw = np.where(sw > 0, sw, np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(w * (np.float32(1) / sw)[:, None]), -127, 127)
    return codes, sw


def ref_llm_int8(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, thr: float) -> np.ndarray:
    """y = S_x S_w (X_i8[:, ~O] W_i8[:, ~O]^T) + X[:, O] W_dq[:, O]^T + b, with
    O = {j : max_i |X_ij| >= thr} and X_i8 row-wise absmax int8 over the columns not in O."""
    x = np.asarray(x, np.float32)
    codes, sw = ref_weight(w)
    out = np.abs(x).max(0) >= thr if x.shape[0] else np.zeros(x.shape[1], bool)
    xr = np.where(out[None, :], np.float32(0), x).astype(np.float32)
    sx = (np.abs(xr).max(1) / np.float32(127)).astype(np.float32)
    sx = np.where(sx > 0, sx, np.float32(1)).astype(np.float32)
    xq = np.clip(np.rint(xr * (np.float32(1) / sx)[:, None]), -127, 127)
    y = (xq @ codes.T) * sx[:, None].astype(np.float64) * sw[None, :]
    wdq = codes * sw[:, None].astype(np.float64)
    y = y + x[:, out].astype(np.float64) @ wdq[:, out].T
    return y if b is None else y + b[None, :]


def make(m=6, k=96, n=40, seed=0, outlier_cols=(3, 50), mag=40.0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    x = torch.randn(m, k, generator=g)  # |x| < 6 for these seeds (checked by the tests)
    for j in outlier_cols:
        x[:, j] *= mag
    return lin, x


def mixed(lin, thr=6.0) -> QuantLinear:
    return QuantLinear.from_float(lin, "int8", group_size=None, act="int8_mixed", threshold=thr)


def plain(lin) -> QuantLinear:
    return QuantLinear.from_float(lin, "int8", group_size=None, act="int8_dynamic")


def np_(t):
    return t.detach().double().numpy()


def close(got: torch.Tensor, ref: np.ndarray, rel=2e-5):
    scale = max(1.0, float(np.abs(ref).max(initial=0)))
    np.testing.assert_allclose(np_(got), ref, rtol=0, atol=rel * scale)


# ---- the kernel ---------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
def test_matches_paper_reference_with_outliers(isa):
    qkern.set_isa(isa)
    lin, x = make()
    ql = mixed(lin)
    assert ql.kernel == "w8a8_mixed"
    ref = ref_llm_int8(np_(x), np_(lin.weight), np_(lin.bias), 6.0)
    close(ql(x), ref)
    # 3-D input, bfloat16 input (computed in float32, returned in bfloat16)
    y3 = ql(x.reshape(2, 3, -1))
    assert y3.shape == (2, 3, 40)
    torch.testing.assert_close(y3.reshape(6, -1), ql(x), rtol=0, atol=0)
    yb = ql(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    close(yb.float(), ref_llm_int8(np_(x.bfloat16()), np_(lin.weight), np_(lin.bias), 6.0),
          rel=1e-2)


def test_no_outliers_equals_plain_w8a8():
    lin, x = make(outlier_cols=())
    assert float(x.abs().max()) < 6.0
    ql = mixed(lin)
    assert torch.equal(ql(x), plain(lin)(x))
    close(ql(x), ref_llm_int8(np_(x), np_(lin.weight), np_(lin.bias), 6.0))
    # inf: no column is ever an outlier, whatever the input
    _, xo = make(outlier_cols=(1, 2, 3))
    assert torch.equal(mixed(lin, math.inf)(xo), plain(lin)(xo))


def test_outliers_error_far_below_plain_w8a8():
    lin, x = make(m=16, k=256, n=64, outlier_cols=(7, 100, 200), mag=60.0)
    # the activation error (against the same int8 weight in float) and the total error
    codes, sw = ref_weight(np_(lin.weight))
    for w, ratio in ((codes * sw[:, None].astype(np.float64), 0.05), (np_(lin.weight), 0.5)):
        exact = np_(x) @ w.T + np_(lin.bias)
        err_mixed = np.abs(np_(mixed(lin)(x)) - exact).mean()
        err_plain = np.abs(np_(plain(lin)(x)) - exact).mean()
        assert err_mixed < ratio * err_plain, (err_mixed, err_plain)


def test_threshold_edges():
    lin, x = make(outlier_cols=())
    x[:, 5] = 0.5
    x[2, 5] = -6.0  # |x| == threshold: an outlier column (>=)
    ref_at = ref_llm_int8(np_(x), np_(lin.weight), np_(lin.bias), 6.0)
    ref_above = ref_llm_int8(np_(x), np_(lin.weight), np_(lin.bias), 6.0001)
    assert np.abs(ref_at - ref_above).max() > 1e-4  # the edge decides something
    close(mixed(lin, 6.0)(x), ref_at)
    close(mixed(lin, 6.0001)(x), ref_above)
    assert torch.equal(mixed(lin, 6.0001)(x), plain(lin)(x))
    # threshold 0: every column is computed in float against the dequantized int8 weight
    codes, sw = ref_weight(np_(lin.weight))
    exact_dq = np_(x) @ (codes * sw[:, None].astype(np.float64)).T + np_(lin.bias)
    close(mixed(lin, 0.0)(x), exact_dq, rel=1e-6)
    # an all-zero row next to outliers, no rows, K with no multiple of 4 (packed padding)
    lin2, x2 = make(m=3, k=37, n=17, outlier_cols=(36,))
    x2[1] = 0.0
    close(mixed(lin2)(x2), ref_llm_int8(np_(x2), np_(lin2.weight), np_(lin2.bias), 6.0))
    assert mixed(lin2)(x2[:0]).shape == (0, 17)


def test_gather_columns_reads_the_packed_layout():
    lin, _ = make(k=37, n=21, outlier_cols=())
    ql = mixed(lin)
    codes = unpack_w8(ql.w8_packed, 21, 37)
    cols = torch.tensor([0, 3, 4, 17, 36])
    assert torch.equal(gather_w8_columns(ql.w8_packed, 21, 37, cols), codes[:, cols].T)


def test_bad_thresholds_and_inputs():
    lin, x = make()
    for bad in (-1.0, float("nan"), True, "6"):
        with pytest.raises(ValueError, match="threshold"):
            mixed(lin, bad)
        with pytest.raises(ValueError, match="threshold"):
            qkern.LLMInt8Config(threshold=bad)
    with pytest.raises(ValueError, match="only with"):
        QuantLinear.from_float(lin, "int8", group_size=None, act="int8_dynamic", threshold=6.0)
    with pytest.raises(ValueError, match="only with"):
        QuantLinear.from_float(lin, "int8", group_size=None, act="int8_mixed")
    with pytest.raises(ValueError, match="int8 weights per output channel"):
        QuantLinear.from_float(lin, "int4", group_size=32, act="int8_mixed", threshold=6.0)
    ql = mixed(lin)
    for v in (float("nan"), float("inf")):
        xb = x.clone()
        xb[1, 2] = v
        with pytest.raises(NonFiniteError, match="NaN or Inf"):
            ql(xb)
    args = (x, ql.w8_packed, ql.w8_scale, None, 40, 96)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        OPS.gemm_w8a8_mixed(*args, torch.tensor([-2.0]))
    with pytest.raises(ValueError, match="1-element float tensor"):
        OPS.gemm_w8a8_mixed(*args, torch.tensor([6, 7]))


# ---- torch integration: opcheck, compile, autograd, save / load --------------------------

def test_opcheck_and_compile():
    lin, x = make(k=40, n=24, outlier_cols=(2,))
    ql = mixed(lin)
    opcheck(OPS.gemm_w8a8_mixed.default,
            (x, ql.w8_packed, ql.w8_scale, ql.bias, 24, 40, ql.outlier_threshold))
    model = nn.Sequential(ql, nn.ReLU(), mixed(nn.Linear(24, 8)))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


def test_gradient_is_that_of_the_dequantized_weight():
    lin, x = make(outlier_cols=(4,))
    ql = mixed(lin)
    x = x.requires_grad_()
    g = torch.randn(6, 40)
    ql(x).backward(g)
    codes, sw = ref_weight(np_(lin.weight))
    ref = np_(g) @ (codes * sw[:, None].astype(np.float64))
    np.testing.assert_allclose(np_(x.grad), ref, rtol=1e-5, atol=1e-5)


def test_quantize_model_save_load(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"fc": nn.Linear(32, 16), "lm_head": nn.Linear(16, 8)})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lm_head = model["fc"], model["lm_head"]

        def forward(self, x):
            return self.lm_head(torch.relu(self.fc(x)))

    net = Net()
    cfg = qkern.LLMInt8Config(threshold=2.5)
    assert qkern.quantization.BaseConfig.from_json(cfg.to_json()) == cfg
    q = qkern.quantize_model(net, cfg)
    assert isinstance(q.fc, QuantLinear) and q.fc.act == "int8_mixed"
    assert type(q.lm_head) is nn.Linear  # kept in float by default
    x = torch.randn(5, 32)
    x[:, 7] = 9.0
    path = os.path.join(tmp_path, "m.safetensors")
    qkern.save(q, path)
    r = qkern.load(path, Net)
    assert float(r.fc.outlier_threshold) == 2.5 and r.fc.kernel == "w8a8_mixed"
    assert torch.equal(r(x), q(x))
    # a file whose threshold is negative is refused, naming the tensor
    q.fc.outlier_threshold.fill_(-1.0)
    qkern.save(q, path, overwrite=True)
    with pytest.raises(BadFile, match="outlier_threshold"):
        qkern.load(path, Net)


class _RefMixed(nn.Module):
    def __init__(self, lin: nn.Linear, thr: float):
        super().__init__()
        self.lin, self.thr = lin, thr

    def forward(self, x):
        b = None if self.lin.bias is None else np_(self.lin.bias)
        y = ref_llm_int8(np_(x.reshape(-1, x.shape[-1])), np_(self.lin.weight), b, self.thr)
        return torch.from_numpy(y).float().reshape(*x.shape[:-1], -1)


def test_tiny_llama_end_to_end():
    """Every block linear of a tiny transformers Llama (threshold 1: outliers in most calls)
    against the reference; the LM head and embeddings stay float."""
    model = LM.build("llama")
    q = qkern.quantize_model(model, qkern.LLMInt8Config(threshold=1.0))
    assert type(q.lm_head) is nn.Linear and type(q.get_input_embeddings()) is nn.Embedding
    ref = LM.build("llama")
    names = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert len(names) == 14
    for n in names:
        assert q.get_submodule(n).kernel == "w8a8_mixed"
        parent, _, child = n.rpartition(".")
        setattr(ref.get_submodule(parent), child, _RefMixed(ref.get_submodule(n), 1.0))
    ids = LM.calibration(1, 12, seed=5)[0]
    torch.testing.assert_close(LM.output(q, ids), LM.output(ref, ids), atol=2e-4, rtol=2e-4)
