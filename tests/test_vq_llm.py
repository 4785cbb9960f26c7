"""GPTVQ (qkern.quantization.algorithms.vq) and its layer (qkern.vq.linear.VQLinear).

References written here from the definitions, in numpy: the Hessian-weighted objective
tr((W - Q) H (W - Q)^T), the brute-force nearest codebook entry, the decode of codes +
codebooks + scales, the bit count of codes + codebooks + scales."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import llm_models as LM
import qkern
from qkern.quantization import VQConfig
from qkern.quantization.algorithms.vq import (
    model_bits_per_weight,
    vq_linear,
    vq_linear_from,
    vq_quantize,
)
from qkern.vq.linear import VQLinear


def _objective(w, q, h) -> float:
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.trace(d @ np.asarray(h, np.float64) @ d.T))


def _decode(codes, books, scales, group_rows) -> np.ndarray:
    """W[r, v*dim:(v+1)*dim] = scale(r, segment) * books[r // group_rows, codes[r, v]]."""
    codes = codes.numpy().astype(np.int64)
    books = books.float().numpy().astype(np.float64)
    out, nv = codes.shape
    dim = books.shape[2]
    w = np.zeros((out, nv * dim))
    for r in range(out):
        for v in range(nv):
            w[r, v * dim:(v + 1) * dim] = books[r // group_rows, codes[r, v]]
    if scales is not None:
        s = scales.float().numpy().astype(np.float64)
        seg = nv * dim // s.shape[1]
        w *= np.repeat(s, seg, axis=1)
    return w


def _nearest(w, books, scales, group_rows, dim) -> np.ndarray:
    """Brute force: each vector (divided by its scale) to its group's nearest entry."""
    w = w.numpy().astype(np.float64)
    out, n_in = w.shape
    b = books.float().numpy().astype(np.float64)
    s = None if scales is None else np.repeat(scales.float().numpy(), n_in // scales.shape[1], 1)
    wn = w if s is None else w / s
    codes = np.zeros((out, n_in // dim), np.int64)
    for r in range(out):
        vec = wn[r].reshape(-1, dim)
        d2 = ((vec[:, None, :] - b[r // group_rows][None]) ** 2).sum(-1)
        codes[r] = d2.argmin(1)
    return codes


def _problem(seed, out=24, n_in=32, n=400):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g)
    x = torch.randn(n, n_in, generator=g) @ mix + 0.3 * torch.randn(n, n_in, generator=g)
    w = torch.randn(out, n_in, generator=g)
    return w, x.T @ x / n


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dim,rows,sg", [(2, None, None), (2, 8, 16), (4, None, None)])
def test_feedback_beats_nearest_assignment(seed, dim, rows, sg):
    w, gram = _problem(seed)
    res = vq_quantize(w, gram, bits=2 if dim == 2 else 1, dim=dim, group_rows=rows,
                      scale_group=sg, update_codebooks=False)
    plain = vq_quantize(w, gram, bits=2 if dim == 2 else 1, dim=dim, group_rows=rows,
                        scale_group=sg, feedback=False)
    near = _nearest(w, res.codebooks, res.scales, res.group_rows, dim)
    assert np.array_equal(plain.codes.numpy().astype(np.int64), near)
    q_near = _decode(torch.from_numpy(near).to(torch.uint8), res.codebooks, res.scales,
                     res.group_rows)
    q_fb = _decode(res.codes, res.codebooks, res.scales, res.group_rows)
    assert np.allclose(q_fb, res.weight.numpy(), atol=1e-6)
    h = gram.numpy()
    assert _objective(w, q_fb, h) < 0.95 * _objective(w, q_near, h)


def test_identity_hessian_is_nearest_assignment():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 32, generator=g)
    res = vq_quantize(w, torch.eye(32) * 0.5, bits=2, dim=2, group_rows=8,
                      update_codebooks=False)
    near = _nearest(w, res.codebooks, None, 8, 2)
    assert np.array_equal(res.codes.numpy().astype(np.int64), near)


def test_loss_is_the_damped_objective():
    w, gram = _problem(9)
    res = vq_quantize(w, gram, bits=2, dim=2, damp_percent=0.0, update_codebooks=False)
    h = 2 * gram.numpy().astype(np.float64)
    assert res.loss == pytest.approx(_objective(w, res.weight, h) / 2, rel=1e-3)
    assert res.sweep_loss == pytest.approx(res.loss, rel=1e-3)  # the OBS errors add up


@pytest.mark.parametrize("sg", [None, 4])
def test_codebook_update_is_the_least_squares_optimum(sg):
    """numpy: the design matrix of Q = A vec(C) built entry by entry, then lstsq on
    H^(1/2)-weighted rows; the codes stay, the codebook is the minimizer."""
    w, gram = _problem(11, out=12, n_in=8)
    kw = dict(bits=1, dim=2, group_rows=6, scale_group=sg, codebook_dtype="float32",
              damp_percent=0.0)
    before = vq_quantize(w, gram, update_codebooks=False, **kw)
    after = vq_quantize(w, gram, **kw)
    assert torch.equal(before.codes, after.codes)
    h = 2 * gram.numpy().astype(np.float64)
    root = np.linalg.cholesky(h)                          # h = L L^T
    codes = after.codes.numpy().astype(np.int64)
    s = np.ones((12, 8)) if sg is None else np.repeat(after.scales.float().numpy(), sg, 1)
    for g in range(2):
        rows = range(6 * g, 6 * g + 6)
        a = np.zeros((6 * 8, 4 * 2))                      # vec(Q_rows) = a @ vec(C)
        for i, r in enumerate(rows):
            for col in range(8):
                a[i * 8 + col, codes[r, col // 2] * 2 + col % 2] = s[r, col]
        # sum_r (w_r - q_r) h (w_r - q_r)^T = || (w_r - q_r) L ||^2 stacked over rows
        big = np.kron(np.eye(6), root.T)
        c, *_ = np.linalg.lstsq(big @ a, big @ w.numpy()[list(rows)].reshape(-1), rcond=None)
        assert np.allclose(after.codebooks[g].numpy().reshape(-1), c, atol=1e-4)
    wn = w.numpy()
    assert _objective(wn, after.weight, h) <= _objective(wn, before.weight, h)


def test_bits_per_weight_by_hand():
    # 32 x 16, dim 2, 2 bits: 32 * 8 codes of 4 bits = 1024; 4 groups of 8 rows x 16 entries
    # x 2 float16 = 2048; scales 32 rows x 2 segments x 16 = 1024 -> 4096 bits / 512 weights
    w, gram = _problem(1, out=32, n_in=16)
    layer = vq_linear_from(vq_quantize(w, gram, bits=2, dim=2, group_rows=8, scale_group=8),
                           None)
    assert (layer.code_bits, layer.overhead_bits) == (1024, 3072)
    assert layer.bits_per_weight == 8.0
    # float32 codebooks, no scales, per layer: 1024 + 16 * 2 * 32 = 2048 bits
    layer = vq_linear_from(vq_quantize(w, gram, bits=2, dim=2, codebook_dtype="float32"), None)
    assert layer.bits_per_weight == 2048 / 512
    assert layer.codebooks.dtype == torch.float32
    # 2.5 bits at dim 2: 32-entry codebook, 5-bit codes: 32 * 8 * 5 + 32 * 2 * 16 = 2304 bits
    layer = vq_linear_from(vq_quantize(w, gram, bits=2.5, dim=2), None)
    assert layer.k == 32 and layer.bits_per_weight == 2304 / 512


def test_scales_are_segment_maxima_in_float16():
    w, gram = _problem(2, out=8, n_in=32)
    res = vq_quantize(w, gram, bits=2, dim=2, scale_group=16)
    ref = np.abs(w.numpy()).reshape(8, 2, 16).max(2).astype(np.float16)
    assert res.scales.dtype == torch.float16 and np.array_equal(res.scales.numpy(), ref)


def test_codes_dtype_follows_codebook_size():
    w, gram = _problem(3, out=64, n_in=64)
    assert vq_quantize(w, gram, bits=2, dim=4).codes.dtype == torch.uint8
    assert vq_quantize(w, gram, bits=5, dim=2, kmeans_iters=2).codes.dtype == torch.uint16


@pytest.mark.parametrize("kw,match", [
    ({"dim": 3}, "dim must be one of"),
    ({"bits": 4, "dim": 4}, r"2\^16"),
    ({"bits": 0}, "bits must be"),
    ({"bits": 1.25, "dim": 2}, "must be a positive integer"),
    ({"bits": 2, "dim": 2, "scale_group": 3}, "not a multiple of dim"),
    ({"group_rows": 0}, "group_rows must be"),
    ({"codebook_dtype": "bfloat16"}, "codebook_dtype"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        VQConfig(**kw)


def test_bad_shapes():
    w, gram = _problem(4, out=8, n_in=30)
    with pytest.raises(ValueError, match="dim=4 does not divide in_features=30"):
        vq_quantize(w, gram, bits=1, dim=4)
    with pytest.raises(ValueError, match="fewer than the 2\\^8"):
        vq_quantize(w, gram, bits=4, dim=2, group_rows=2)
    with pytest.raises(ValueError, match="gram must be"):
        vq_quantize(w, gram[:4, :4], dim=2)
    with pytest.raises(ValueError, match="scale_group=20 does not divide"):
        vq_quantize(w, gram, dim=2, scale_group=20)
    with pytest.raises(TypeError, match="nn.Linear"):
        vq_linear(nn.Conv1d(3, 3, 1), gram, VQConfig())


def test_layer_forward_is_x_times_decoded_weight():
    w, gram = _problem(6, out=24, n_in=32)
    lin = nn.Linear(32, 24)
    lin.weight.data.copy_(w)
    layer = vq_linear(lin, gram, VQConfig(bits=2, dim=2, group_rows=8, scale_group=16))
    wd = _decode(layer.codes, layer.codebooks, layer.scales, 8)
    x = torch.randn(5, 3, 32)
    ref = x.double().numpy() @ wd.T + lin.bias.detach().double().numpy()
    assert np.allclose(layer(x).detach().numpy(), ref, atol=1e-4)
    assert np.allclose(layer.dequantize_weight().numpy(), wd, atol=1e-6)


def test_pipeline_quantizes_every_block_linear():
    model = LM.build("llama")
    cal = LM.calibration()
    q = qkern.quantize_model(copy.deepcopy(model), VQConfig(bits=2, dim=2, kmeans_iters=5),
                             cal, progress=False)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, VQLinear)}
    assert len(layers) == 2 * 7
    # the quantized model = the float model with every weight replaced by its decode
    ref = copy.deepcopy(model)
    for n, m in layers.items():
        ref.get_submodule(n).weight.data = torch.from_numpy(
            _decode(m.codes, m.codebooks, m.scales, m.group_rows)).float()
    ids = cal[0]
    with torch.no_grad():
        assert torch.allclose(LM.output(q, ids), LM.output(ref, ids), atol=1e-4)
    bits, n = model_bits_per_weight(q)
    ref_bits = sum(m.out_features * m.in_features * 2 + 16 * 2 * 16 for m in layers.values())
    assert (bits, n) == (ref_bits, sum(m.out_features * m.in_features for m in layers.values()))


def test_config_round_trips_json():
    cfg = VQConfig(bits=2.5, dim=2, group_rows=32, scale_group=64, exclude=["lm_head"])
    back = qkern.quantization.BaseConfig.from_json(cfg.to_json())
    assert back == cfg and type(back) is VQConfig


def test_pipeline_scale_group_falls_back_to_one_scale_per_row():
    model = LM.build("llama")  # hidden 64, MLP 128: scale_group 128 fits down_proj only
    with pytest.warns(UserWarning):
        q = qkern.quantize_model(model, VQConfig(bits=2, dim=2, scale_group=128,
                                                 kmeans_iters=3), LM.calibration(),
                                 progress=False)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, VQLinear)}
    assert len(layers) == 14
    for n, m in layers.items():
        assert m.scales.shape == (m.out_features, 1), n
