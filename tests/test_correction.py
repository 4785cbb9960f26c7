"""Calibration and error correction (qkern.quantization.algorithms: equalization, smoothquant,
bias_correction, clip_search, adaround; the calibration toolkit).

Each technique against an independent check (numpy formulas on tiny layers, hand-computed
AdaRound values, brute-force searches over the grid), and each one's gain on the real digits
MLP / CNN: the mean squared logit difference to the float model on the test split, with and
without the technique, same data and seeds. ``python -m pytest tests/test_correction.py -s``
prints the gains (the README table quotes them)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkern
from qkern.models import digits
from qkern.nn import QuantLinear
from qkern.quantization import (
    AdaRoundConfig,
    BaseConfig,
    StaticConfig,
    WeightOnlyConfig,
    bias_correction,
    cross_layer_equalization,
    smooth_quant,
)
from qkern.quantization.algorithms import adaround as A
from qkern.quantization.algorithms.clip_search import CLIP_GRID, output_clip_search
from qkern.quantization.algorithms.equalization import layer_pairs
from qkern.quantization.layers import weight_module

GAINS: list[tuple[str, str, float, float]] = []


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the digits models are tiny: one thread is faster than two on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if GAINS:
        print("\n| technique | model, setting | without | with | ratio |")
        print("|---|---|--:|--:|--:|")
        for tech, setting, a, b in GAINS:
            print(f"| {tech} | {setting} | {a:.4f} | {b:.4f} | {b / a:.2f} |")


@pytest.fixture(scope="module")
def data():
    return digits.load_data()


@pytest.fixture(scope="module")
def mlp(data, _one_thread):
    return digits.train("mlp", data, epochs=15)


@pytest.fixture(scope="module")
def cnn(data, _one_thread):
    return digits.train("cnn", data, epochs=8)


@pytest.fixture(scope="module")
def calib(data):
    return list(data.x_calib.split(64))


def _quant(model, cfg, calib=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qkern.quantize_model(model, cfg, calibration=calib)


@torch.no_grad()
def _err(q, m, data) -> float:
    return float(((q(data.x_test) - m(data.x_test)) ** 2).mean())


def _gain(tech, setting, model, data, without, with_) -> float:
    a, b = _err(without, model, data), _err(with_, model, data)
    GAINS.append((tech, setting, a, b))
    return b / a


def _np(t):
    return t.detach().double().numpy()


# ---- cross-layer equalization ---------------------------------------------------------------


def test_cle_formula_on_a_tiny_pair_matches_numpy():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight[1] *= 20  # unequal channel ranges
        m[2].weight[:, 3] *= 0.05
    w1, b1, w2 = _np(m[0].weight), _np(m[0].bias), _np(m[2].weight)
    r1, r2 = np.abs(w1).max(1), np.abs(w2).max(0)
    s = np.sqrt(r1 / r2)
    e = cross_layer_equalization(m, iterations=1)
    np.testing.assert_allclose(_np(e[0].weight), w1 / s[:, None], rtol=1e-6)
    np.testing.assert_allclose(_np(e[0].bias), b1 / s, rtol=1e-6)
    np.testing.assert_allclose(_np(e[2].weight), w2 * s[None, :], rtol=1e-6)
    # both sides now share the range sqrt(r1 r2); the input model is untouched
    np.testing.assert_allclose(np.abs(_np(e[0].weight)).max(1), np.sqrt(r1 * r2), rtol=1e-6)
    np.testing.assert_allclose(np.abs(_np(e[2].weight)).max(0), np.sqrt(r1 * r2), rtol=1e-6)
    assert np.array_equal(_np(m[0].weight), w1)
    x = torch.randn(7, 5)
    torch.testing.assert_close(e(x), m(x), rtol=1e-5, atol=1e-6)


def test_cle_conv_flatten_linear_pairs_and_function(cnn, mlp, data):
    assert layer_pairs(mlp) == [("1", "3"), ("3", "5")]
    assert layer_pairs(cnn) == [("0", "2"), ("2", "6"), ("6", "8")]
    for m in (mlp, cnn):
        e = cross_layer_equalization(m)
        with torch.no_grad():
            ref, got = m(data.x_test), e(data.x_test)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        # ranges equalized: channel i of layer 1 and input channel i of layer 2 agree
        for n1, n2 in layer_pairs(e):
            a, b = e.get_submodule(n1), e.get_submodule(n2)
            c = a.weight.shape[0]
            r1 = a.weight.detach().reshape(c, -1).abs().amax(1)
            r2 = b.weight.detach().reshape(b.weight.shape[0], c, -1).abs().amax(dim=(0, 2))
            torch.testing.assert_close(r1, r2, rtol=2e-2, atol=0)


def test_layer_pairs_only_across_homogeneous_modules():
    seq = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4), nn.ReLU6(), nn.Linear(4, 4),
                        nn.Dropout(), nn.ReLU(), nn.Linear(4, 2),
                        nn.Sequential(nn.Linear(2, 2)))  # nested: its own container
    assert layer_pairs(seq) == [("4", "7")]
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Linear(6, 2))  # no Flatten
    assert layer_pairs(conv) == []
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    assert layer_pairs(grouped) == []


def test_cle_gain_int4_per_tensor(mlp, cnn, data):
    """CLE cuts the MLP's int4 per-tensor error by over a quarter for each of three training
    seeds (0.59 / 0.65 / 0.67; the MLP trains to the same bits on AVX2 and AVX-512 CPUs). The
    CNN's ratio is printed, not asserted: it depends on the trained model, which differs
    between CPUs (torch's convolutions sum in another order): 0.51 on an AVX-512 Xeon, and
    0.73 - 1.24 (mean 0.94) over seeds 0 - 4 on an AVX2-only EPYC, so CLE is no reliable gain
    on it (README, "Gains on the digits models")."""
    for name, m in (("MLP", mlp), ("MLP seed 1", None), ("MLP seed 2", None), ("CNN", cnn)):
        if m is None:
            with torch.random.fork_rng():
                m = digits.train("mlp", data, epochs=15, seed=int(name[-1]))
        base = _quant(m, WeightOnlyConfig(fmt="int4", per_tensor=True))
        cle = _quant(m, WeightOnlyConfig(fmt="int4", per_tensor=True,
                                         cross_layer_equalization=True))
        first = cle[0].qlinear if name == "CNN" else cle[1]
        assert first.weight_q.scale.unique().numel() == 1  # one scale for the layer
        r = _gain("cross-layer equalization", f"{name}, int4 per-tensor weights", m, data,
                  base, cle)
        assert name == "CNN" or r < 0.75, (name, r)


# ---- bias correction ------------------------------------------------------------------------


def test_bias_correction_matches_the_mean_error_by_hand():
    torch.manual_seed(1)
    lin = nn.Linear(16, 6, bias=False)
    fm = nn.Sequential(lin)
    qm = nn.Sequential(QuantLinear.from_float(lin, "int3", group_size=None))
    calib = [torch.randn(32, 16) + 0.5 for _ in range(3)]
    x = torch.cat(calib)
    wq = qm[0].dequantize_weight()
    want = (_np(x) @ _np(wq).T - _np(x) @ _np(lin.weight).T).mean(0)
    done = bias_correction(fm, qm, calib)
    np.testing.assert_allclose(_np(done["0"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(qm[0].bias), -want, rtol=1e-5, atol=1e-6)  # created
    with torch.no_grad():  # the mean output error on the calibration data is now zero
        assert (qm(x) - fm(x)).mean(0).abs().max() < 1e-5


def test_bias_correction_gain(mlp, cnn, data, calib):
    for name, m, fmt in (("MLP", mlp, "int3"), ("CNN", cnn, "int4")):
        base = _quant(m, WeightOnlyConfig(fmt=fmt, group_size=None))
        fixed = _quant(m, WeightOnlyConfig(fmt=fmt, group_size=None, bias_correction=True),
                       calib)
        r = _gain("bias correction", f"{name}, {fmt} per-channel weights", m, data, base, fixed)
        assert r < 0.6, r
        # the config option is the function applied after convert
        by_hand = _quant(m, WeightOnlyConfig(fmt=fmt, group_size=None))
        bias_correction(m, by_hand, calib)
        with torch.no_grad():
            torch.testing.assert_close(by_hand(data.x_test), fixed(data.x_test))
    with pytest.raises(ValueError, match="calibration"):
        qkern.quantize_model(mlp, WeightOnlyConfig(bias_correction=True))
    p = qkern.prepare(mlp, WeightOnlyConfig(clip_search="output"))
    with pytest.raises(ValueError, match="seen no data"):
        qkern.convert(p)


# ---- AdaRound -------------------------------------------------------------------------------


def test_rectified_sigmoid_regularizer_and_annealing_by_hand():
    v = torch.tensor([0.0, math.log(3.0), 50.0, -50.0, math.log(1 / 3)])
    # sigmoid = 0.5, 0.75, 1, 0, 0.25 -> * 1.2 - 0.1 -> 0.5, 0.8, 1.1 (clip 1), -0.1 (0), 0.2
    torch.testing.assert_close(A.rectified_sigmoid(v), torch.tensor([0.5, 0.8, 1.0, 0.0, 0.2]))
    h = torch.tensor([0.0, 0.5, 1.0, 0.75])
    # 1 - |2h - 1|^beta: beta 2 -> 0, 1, 0, 0.75; beta 20 -> 0, 1, 0, 1 - 0.5^20
    assert float(A.rounding_regularizer(h, 2.0)) == pytest.approx(1.75)
    assert float(A.rounding_regularizer(h, 20.0)) == pytest.approx(2 - 0.5 ** 20)
    sched = [A.beta_schedule(t, 100, warmup=0.2) for t in (0, 19, 20, 60, 99)]
    assert sched == [(False, 20.0), (False, 20.0), (True, 20.0), (True, 11.0),
                     (True, pytest.approx(2.0 + 18.0 / 80))]
    hs = torch.tensor([0.05, 0.3, 0.5, 0.9])
    torch.testing.assert_close(A.rectified_sigmoid(A.inverse_rectified_sigmoid(hs)), hs)


def test_adaround_codes_are_floor_or_ceil_and_deterministic():
    torch.manual_seed(2)
    w, x = torch.randn(8, 32), torch.randn(300, 32)
    kw = dict(group_size=16, symmetric=False, iterations=120, seed=5)
    r1 = A.adaround_weight(w, x, None, "int3", **kw)
    r2 = A.adaround_weight(w, x, None, "int3", **kw)
    assert torch.equal(r1["codes"], r2["codes"])
    s = r1["scale"].repeat_interleave(16, 1)
    z = r1["zero_point"].repeat_interleave(16, 1).float()
    lo = torch.clamp(torch.floor(w / s) + z, -4, 3)
    hi = torch.clamp(torch.floor(w / s) + 1 + z, -4, 3)
    assert bool(((r1["codes"] == lo) | (r1["codes"] == hi)).all())
    assert not torch.equal(r1["codes"], r1["nearest"])  # it did change some roundings
    assert r1["loss"] < r1["loss_nearest"]
    torch.testing.assert_close(r1["weight"], (r1["codes"] - z) * s, rtol=0, atol=0)
    # qkern.quantize of the learned weight with the same scale gives back the codes
    q = qkern.quantize(r1["weight"], "int3", granularity="group", group_size=16,
                       symmetric=False, scale=r1["scale"], zero_point=r1["zero_point"])
    assert torch.equal(q.codes.long(), r1["codes"])


def test_adaround_gain(mlp, cnn, data, calib):
    for name, m, fmt in (("MLP", mlp, "int3"), ("CNN", cnn, "int4")):
        base = _quant(m, WeightOnlyConfig(fmt=fmt, group_size=None))
        ada = _quant(m, AdaRoundConfig(fmt=fmt), calib)
        assert isinstance(ada[1 if name == "MLP" else 6], QuantLinear)
        r = _gain("AdaRound", f"{name}, {fmt} per-channel weights", m, data, base, ada)
        assert r < 0.6, r
    again = _quant(mlp, AdaRoundConfig(fmt="int3"), calib)
    with torch.no_grad():
        assert torch.equal(again(data.x_test), _quant(mlp, AdaRoundConfig(fmt="int3"),
                                                      calib)(data.x_test))
    with pytest.raises(ValueError, match="calibration"):
        qkern.quantize_model(mlp, AdaRoundConfig())


# ---- SmoothQuant ----------------------------------------------------------------------------


def test_smooth_quant_formula_and_function():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        m[0].weight[2] *= 30  # an outlier channel in layer 2's input
    calib = [torch.randn(40, 6) for _ in range(2)]
    x2 = F.relu(m[0](torch.cat(calib)))
    ax, aw = _np(x2.abs().amax(0)), np.abs(_np(m[2].weight)).max(0)
    s = ax ** 0.6 / aw ** 0.4
    sm = smooth_quant(m, calib, alpha=0.6)
    np.testing.assert_allclose(_np(sm[0].weight), _np(m[0].weight) / s[:, None], rtol=1e-5)
    np.testing.assert_allclose(_np(sm[2].weight), _np(m[2].weight) * s[None, :], rtol=1e-5)
    x = torch.randn(9, 6)
    torch.testing.assert_close(sm(x), m(x), rtol=1e-5, atol=1e-5)
    # the smoothed input channels: max|X_j / s_j| = max|X_j|^0.4 * max|W_j|^0.4
    with torch.no_grad():
        got = F.relu(sm[0](torch.cat(calib))).abs().amax(0)
    np.testing.assert_allclose(_np(got), ax ** 0.4 * aw ** 0.4, rtol=1e-5)


def test_smoothing_gain_w8a8_and_w8a6(mlp, cnn, data, calib):
    for name, m, act in (("CNN", cnn, "int8"), ("MLP", mlp, "int6")):
        base = _quant(m, StaticConfig(act_fmt=act), calib)
        smooth = _quant(m, StaticConfig(act_fmt=act, smoothing_alpha=0.8), calib)
        r = _gain("SmoothQuant (alpha 0.8)", f"{name}, W8A{act[3:]} static", m, data, base,
                  smooth)
        assert r < 0.85, r


# ---- output clip search ("ghost clipping") -----------------------------------------------------


def test_clip_search_is_the_row_wise_argmin_of_the_output_error():
    torch.manual_seed(4)
    w = torch.randn(6, 24)
    w[:, 0] *= 6  # outliers make clipping worthwhile
    x = torch.randn(200, 24) * torch.linspace(0.2, 2.0, 24)
    gram = (x.double().T @ x.double()) / x.shape[0]
    kw, ratios = output_clip_search(w, gram, "int3", group_size=None)
    grid = CLIP_GRID
    errs = np.zeros((len(grid), 6))
    for i, r in enumerate(grid):  # brute force: the layer's outputs on x
        wq = qkern.quantize(w, "int3", granularity="channel",
                            clip_ratio=None if r == 1.0 else r).dequantize()
        errs[i] = ((_np(x) @ _np(wq).T - _np(x) @ _np(w).T) ** 2).mean(0)
    np.testing.assert_allclose(ratios.numpy(), np.array(grid)[errs.argmin(0)])
    got = qkern.quantize(w, "int3", granularity="channel", scale=kw["scale"]).dequantize()
    out_err = ((_np(x) @ _np(got).T - _np(x) @ _np(w).T) ** 2).mean(0)
    np.testing.assert_allclose(out_err, errs.min(0), rtol=1e-6)


def test_clip_search_gain_and_output_beats_weight_mse(mlp, cnn, data, calib):
    for name, m, fmt in (("MLP", mlp, "int3"), ("CNN", cnn, "int4")):
        base = _quant(m, WeightOnlyConfig(fmt=fmt, group_size=None))
        clip = _quant(m, WeightOnlyConfig(fmt=fmt, group_size=None, clip_search="output"),
                      calib)
        r = _gain("output clip search", f"{name}, {fmt} per-channel weights", m, data, base,
                  clip)
        assert r < 0.6, r
    # the same search with H = I picks clip ratios by weight MSE: worse on the outputs
    def weight_mse_params(w, g):
        kw, _ = output_clip_search(w, torch.eye(w.shape[1], dtype=torch.float64), "int3")
        return kw

    wmse = _quant(mlp, WeightOnlyConfig(fmt="int3", group_size=None))
    for name in ("1", "3", "5"):
        wmse[int(name)] = weight_module(mlp[int(name)], "int3", None, {}, name,
                                        params=weight_mse_params)
    out = _quant(mlp, WeightOnlyConfig(fmt="int3", group_size=None, clip_search="output"),
                 calib)
    assert _err(out, mlp, data) < _err(wmse, mlp, data)


# ---- progressive calibration ----------------------------------------------------------------


def test_progressive_ranges_come_from_the_quantized_prefix(mlp, data, calib):
    cfg = StaticConfig(fmt="int4", progressive=True)
    q = _quant(mlp, cfg, calib)
    with torch.no_grad():  # layer 3's input through the already-quantized layer 1
        h = torch.cat([q[2](q[1](q[0](b))) for b in calib])
    assert float(q[3].scale) == pytest.approx(float(h.abs().max()) / 127, rel=1e-6)
    plain = _quant(mlp, StaticConfig(fmt="int4"), calib)
    with torch.no_grad():
        hf = torch.cat([mlp[2](mlp[1](mlp[0](b))) for b in calib])
    assert float(plain[3].scale) == pytest.approx(float(hf.abs().max()) / 127, rel=1e-6)
    # the recorded batches make a one-shot iterator enough
    once = _quant(mlp, cfg, iter(calib))
    with torch.no_grad():
        assert torch.equal(once(data.x_test), q(data.x_test))


def test_progressive_gain_w4a8(mlp, cnn, data, calib):
    for name, m in (("MLP", mlp), ("CNN", cnn)):
        cfg = StaticConfig(fmt="int4", clip_search="output")
        base = _quant(m, cfg, calib)
        prog = _quant(m, StaticConfig(fmt="int4", clip_search="output", progressive=True),
                      calib)
        r = _gain("progressive calibration", f"{name}, W4A8 static, output clip search", m,
                  data, base, prog)
        assert r < 0.95, r


# ---- configs --------------------------------------------------------------------------------


def test_new_config_fields_round_trip_and_validate():
    cfgs = [WeightOnlyConfig(per_tensor=True, cross_layer_equalization=True,
                             clip_search="output", bias_correction=True),
            StaticConfig(fmt="int4", progressive=True, smoothing_alpha=0.75, clip_search="output",
                         bias_correction=True, cross_layer_equalization=True, per_tensor=True),
            AdaRoundConfig(fmt="uint4", group_size=32, symmetric=False, iterations=50, lr=0.1,
                           batch_size=64, reg_weight=0.05, beta_start=10, beta_end=1,
                           warmup=0.1, quantized_inputs=False, clip_search="output",
                           cross_layer_equalization=True, seed=3, verbose=True,
                           overrides={"head": {"iterations": 10}})]
    for cfg in cfgs:
        assert BaseConfig.from_json(cfg.to_json()) == cfg
    bad = [(WeightOnlyConfig, {"clip_search": "weights"}, "clip_search"),
           (WeightOnlyConfig, {"bias_correction": 1}, "bias_correction"),
           (WeightOnlyConfig, {"cross_layer_equalization": "yes"}, "cross_layer_equalization"),
           (WeightOnlyConfig, {"per_tensor": True, "fmt": "nf4"}, "per_tensor"),
           (WeightOnlyConfig, {"clip_search": "output", "fmt": "nf4", "double_quant": True},
            "clip_search"),
           (StaticConfig, {"progressive": None}, "progressive"),
           (StaticConfig, {"smoothing_alpha": 1.5}, "smoothing_alpha"),
           (StaticConfig, {"smoothing_alpha": "0.5"}, "smoothing_alpha"),
           (AdaRoundConfig, {"fmt": "nf4"}, "fmt"),
           (AdaRoundConfig, {"fmt": "ternary"}, "fmt"),
           (AdaRoundConfig, {"iterations": 0}, "iterations"),
           (AdaRoundConfig, {"lr": -1.0}, "lr"),
           (AdaRoundConfig, {"batch_size": 2.5}, "batch_size"),
           (AdaRoundConfig, {"reg_weight": float("nan")}, "reg_weight"),
           (AdaRoundConfig, {"beta_start": 2.0, "beta_end": 20.0}, "beta_end"),
           (AdaRoundConfig, {"warmup": 1.0}, "warmup"),
           (AdaRoundConfig, {"seed": -1}, "seed"),
           (AdaRoundConfig, {"overrides": {"x": {"iterations": 0}}}, "iterations")]
    for cls, kw, field in bad:
        with pytest.raises(ValueError, match=field):
            cls(**kw)


def test_corrected_models_save_and_load(mlp, data, calib, tmp_path):
    for i, cfg in enumerate([AdaRoundConfig(fmt="int4", iterations=20),
                             StaticConfig(fmt="int4", bias_correction=True,
                                          smoothing_alpha=0.5, progressive=True)]):
        q = _quant(mlp, cfg, calib)
        qkern.save(q, tmp_path / f"m{i}.safetensors")
        back = qkern.load(tmp_path / f"m{i}.safetensors", mlp)
        assert back.qkern_config == cfg
        with torch.no_grad():
            torch.testing.assert_close(back(data.x_test), q(data.x_test))
