"""Per-channel histogram (torch.ao's L2 search) and KL (TensorRT entropy) observers: each
channel's result equals the per-tensor observer run on that channel's slice, and the per-slice
ranges equal torch.ao.quantization.HistogramObserver / a numpy TensorRT calibrator written in
the tests; the observers selectable as StaticConfig(weight_observer=...)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.ao.quantization import observer as tao

import qkern
from observer_data import feed, make_batches, ref_kl_threshold_bin_numpy
from qkern import observers as O


def _channel_batches(kind: str, seed: int, axis: int) -> list[torch.Tensor]:
    """Batches (6, 40, 30) moved so the channels lie on ``axis``, widening from batch to batch
    (re-binning), with a zero channel and a constant channel."""
    out = []
    for i, b in enumerate(make_batches(kind, seed, shape=(6, 40 * 30), n=3)):
        b = b.reshape(6, 40, 30) * torch.linspace(0.5, 3.0, 6).reshape(6, 1, 1) * (1 + 0.4 * i)
        b[2] = 0.0
        b[4] = 1.25
        out.append(b.movedim(0, axis))
    return out


CASES = [(O.HistogramObserver, {"fmt": "int8"}), (O.HistogramObserver, {"fmt": "int4"}),
         (O.HistogramObserver, {"fmt": "uint8", "symmetric": False}),
         (O.KLObserver, {"fmt": "int8"}), (O.KLObserver, {"fmt": "int4", "bins": 512})]


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("kind", ["laplace", "outliers"])
def test_per_channel_equals_per_tensor_on_each_slice(cls, kw, axis, kind):
    batches = _channel_batches(kind, 3, axis)
    obs = feed(cls(granularity="channel", axis=axis, **kw), batches)
    lo, hi = obs.min_max_range()
    scale, zp = obs.calculate_qparams()
    assert lo.shape == hi.shape == scale.shape == (6,)
    for c in range(6):
        one = feed(cls(**kw), [b.select(axis, c) for b in batches])
        rlo, rhi = one.min_max_range()
        rs, rzp = one.calculate_qparams()
        assert float(lo[c]) == float(rlo) and float(hi[c]) == float(rhi), c
        assert float(scale[c]) == float(rs)
        assert (zp is None) == (rzp is None) and (zp is None or int(zp[c]) == int(rzp))
    assert float(scale[2]) == 1.0  # the all-zero channel
    q = obs.quantize(batches[-1])
    assert q.scale.shape == (6,)


@pytest.mark.parametrize("fmt,dtype,symmetric", [("uint8", torch.quint8, False),
                                                 ("int8", torch.qint8, True)])
def test_per_channel_histogram_matches_torch_per_slice(fmt, dtype, symmetric):
    """One batch (no re-binning): per channel, torch.ao's histogram and search on the slice."""
    x = make_batches("laplace", 5, shape=(8, 3000), n=1)[0] * torch.arange(1, 9).reshape(8, 1)
    obs = feed(O.HistogramObserver(fmt, symmetric=symmetric, granularity="channel"), [x])
    lo, hi = obs.min_max_range()
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    for c in range(8):
        ref = feed(tao.HistogramObserver(dtype=dtype, qscheme=qscheme), [x[c]])
        np.testing.assert_array_equal(obs.hist.counts[c], ref.histogram.numpy())
        rlo, rhi = ref._non_linear_param_search()
        np.testing.assert_allclose([float(lo[c]), float(hi[c])], [float(rlo), float(rhi)],
                                   rtol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_per_channel_kl_matches_numpy_reference(fmt):
    x = make_batches("outliers", 6, shape=(5, 8192), n=1)[0] * torch.arange(1, 6).reshape(5, 1)
    obs = feed(O.KLObserver(fmt, granularity="channel"), [x])
    levels = qkern.formats.get(fmt).qmax + 1
    h = obs.histogram.numpy()
    assert h.shape == (5, 2048)
    _, hi = obs.min_max_range()
    for c in range(5):
        a = x[c].abs().double().numpy()
        h_np, _ = np.histogram(a, bins=2048, range=(0.0, a.max()))
        np.testing.assert_allclose(h[c], h_np, atol=1.0)  # float32 binning vs numpy's
        m = ref_kl_threshold_bin_numpy(h[c], levels, 128)
        np.testing.assert_allclose(float(hi[c]), min((m + 0.5) * a.max() / 2048, a.max()),
                                   rtol=1e-6)


def test_kl_threshold_bin_rows_and_edge_cases():
    """Each row of a 2-D histogram gets the reference's bin, including histograms whose
    clipped candidates are all infinite (all the mass beyond start_bin), sparse ones and
    round ones (ties)."""
    g = np.random.default_rng(9)
    rows = [np.floor(g.exponential(40.0, 300)), np.zeros(300), np.zeros(300),
            (g.random(300) < 0.05) * g.integers(1, 9, 300), np.ones(300)]
    rows[1][-1] = 7.0  # everything in the last bin
    rows[2][[3, 150, 299]] = [5.0, 1.0, 2.0]
    h = np.stack(rows).astype(np.float64)
    got = O.kl_threshold_bin(h, 16, 32)
    want = [ref_kl_threshold_bin_numpy(r, 16, 32) for r in h]
    assert got.tolist() == want
    assert O.kl_threshold_bin(h[0], 16, 32) == want[0]


def test_per_channel_l2_search_rows_equal_one_at_a_time():
    g = np.random.default_rng(10)
    h = np.stack([np.histogram(g.laplace(size=5000) * s, bins=256)[0] for s in (1, 3, 9)])
    h = h.astype(np.float64)
    start, end = O.l2_range_search(h, 256)
    for c in range(3):
        assert (int(start[c]), int(end[c])) == O.l2_range_search(h[c], 256)


# --------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("wobs", ["histogram", "kl", "mse"])
@pytest.mark.parametrize("aobs", ["histogram", "kl"])
def test_weight_observer_selectable_and_quantize_model_runs(wobs, aobs):
    from qkern.quantization import StaticConfig, quantize_model

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(64, 64)
    cfg = StaticConfig(fmt="int4", weight_observer=wobs, observer=aobs)
    q = quantize_model(model, cfg, [x])
    with torch.no_grad():
        ref = model(x)
        err = float((q(x) - ref).abs().max() / ref.abs().max())
    assert err < 0.3
    # the first layer's weight scales are the per-channel observer's on its weight
    w = model[0].weight.detach()
    obs = feed(O.make_observer(wobs, fmt="int4", granularity="channel"), [w])
    layer = q[0].module
    np.testing.assert_array_equal(layer.weight_q.scale.reshape(-1).numpy(),
                                  obs.calculate_qparams()[0].numpy())


@pytest.mark.parametrize("kw,msg", [
    ({"weight_observer": "kl", "symmetric": False}, "symmetric"),
    ({"weight_observer": "histogram", "group_size": 32}, "group_size"),
    ({"weight_observer": "kl", "per_tensor": True}, "per_tensor"),
    ({"weight_observer": "histogram", "fmt": "nf4"}, "nf4"),
    ({"weight_observer": "lsq"}, "weight_observer"),
])
def test_weight_observer_refusals(kw, msg):
    from qkern.quantization import StaticConfig

    with pytest.raises(ValueError, match=msg):
        StaticConfig(**kw)
