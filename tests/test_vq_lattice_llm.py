"""Lattice codebooks (VQConfig(codebook="d4" / "e8")), the per-row LUT (dim 1, group_rows 1)
and the grouped nearest search of the GPTVQ sweep.

References written here from the definitions, in numpy: D4 = integer vectors with an even
sum, E8 = D8 u (D8 + 1/2); the Voronoi code of L with r = 2^b is the set of points y of L
with y - a strictly inside the Voronoi cell of 0 in rL, a the documented tiny shift
1e-3 * sqrt(2, 3, 5, 7, 11, 13, 17, 19) (the cell of a root lattice is cut out by its
minimal vectors: ||y - a|| < ||y - a - r v|| for every minimal v); brute-force nearest
entries; the bit count of codes + scales (+ levels) by hand."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

import llm_models as LM
import qkern
from qkern.quantization import VQConfig
from qkern.quantization.algorithms.vq import model_bits_per_weight, vq_linear_from, vq_quantize
from qkern.quantization.algorithms.vq_codebooks import LATTICE_SCALE_GRID
from qkern.vq.lattice import lattice_codebook
from qkern.vq.linear import VQLinear
from qkern.vq.search import assign_grouped

SHIFT = 1e-3 * np.sqrt([2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0])


def _roots(kind: str) -> np.ndarray:
    """The minimal vectors: D4's 24 (+-e_i +- e_j), E8's 240 (D8's 112 and the 128
    (+-1/2)^8 with an even number of minus signs)."""
    n = 4 if kind == "D4" else 8
    out = []
    for i, j in itertools.combinations(range(n), 2):
        for si, sj in itertools.product((1, -1), repeat=2):
            v = np.zeros(n)
            v[i], v[j] = si, sj
            out.append(v)
    if kind == "E8":
        for signs in itertools.product((0.5, -0.5), repeat=8):
            if sum(s < 0 for s in signs) % 2 == 0:
                out.append(np.array(signs))
    return np.array(out)


def _in_code(y: np.ndarray, kind: str, r: int) -> np.ndarray:
    """Which rows of y (points of the lattice) lie strictly inside the shifted cell of r L."""
    n = y.shape[1]
    z = y - SHIFT[:n]
    rv = r * _roots(kind)
    # ||z - rv||^2 - ||z||^2 = ||rv||^2 - 2 z.rv
    return ((rv ** 2).sum(1)[None] - 2 * z @ rv.T > 0).all(1)


def _brute_code(kind: str, bits: int) -> np.ndarray:
    """Every lattice point in a box holding the cell, kept if inside it (sorted rows)."""
    r, n = 2 ** bits, (4 if kind == "D4" else 8)
    lim = r if kind == "D4" else r // 2 + 1
    ints = np.stack(np.meshgrid(*[np.arange(-lim, lim + 1.0)] * n, indexing="ij"), -1)
    ints = ints.reshape(-1, n)
    pts = ints[ints.sum(1) % 2 == 0]
    if kind == "E8":
        halves = ints[(ints.sum(1) % 2 == 0)] + 0.5
        pts = np.concatenate([pts, halves])
    pts = pts[(pts ** 2).sum(1) <= (r + 0.01) ** 2]  # the cell lies in the ball of radius
    pts = pts[_in_code(pts, kind, r)]                 # r (both covering radii are 1)
    return pts[np.lexsort(pts.T[::-1])]


def _index(cb: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The positions in lattice_codebook's order of the brute-force code's rows."""
    own = lattice_codebook("D4" if cb.shape[1] == 4 else "E8", int(np.log2(len(cb))) //
                           cb.shape[1], centered=True)
    pos = {tuple(v): i for i, v in enumerate(own)}
    return np.array([pos[tuple(cb[i])] for i in rows])


def _sorted(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


@pytest.mark.parametrize("kind,bits", [("D4", 2), ("D4", 3), ("E8", 1)])
def test_lattice_codebook_is_the_voronoi_code(kind, bits):
    cb = lattice_codebook(kind, bits)
    ref = _brute_code(kind, bits)
    assert len(ref) == 2 ** (bits * cb.shape[1]) == len(cb)
    assert np.array_equal(_sorted(cb), ref)


def test_e8_two_bits_code_is_complete():
    """65536 distinct E8 points strictly inside the shifted cell of 4 E8: exactly one per
    coset (the index of 4 E8 in E8 is 4^8)."""
    cb = lattice_codebook("E8", 2)
    assert cb.shape == (65536, 8) and len(np.unique(cb, axis=0)) == 65536
    frac = cb - np.floor(cb)
    integer = (frac == 0).all(1)
    half = (frac == 0.5).all(1)
    assert (integer | half).all() and (cb.sum(1) % 2 == 0).all()
    for part in np.array_split(cb, 8):
        assert _in_code(part, "E8", 4).all()


def test_centered_codebook_is_a_float16_exact_translate():
    for kind, bits in (("D4", 2), ("D4", 3), ("E8", 2)):
        raw, cen = lattice_codebook(kind, bits), lattice_codebook(kind, bits, centered=True)
        shift = raw - cen
        assert np.array_equal(shift, np.broadcast_to(shift[0], shift.shape))
        assert np.array_equal(shift[0] * 64, np.round(shift[0] * 64))
        assert np.abs(cen.mean(0)).max() <= 1 / 128
        assert np.array_equal(torch.from_numpy(cen).half().double().numpy(), cen)


def _problem(seed, out=16, n_in=32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * (0.5 + torch.rand(out, 1, generator=g))
    x = torch.randn(256, n_in, generator=g) @ (torch.eye(n_in) + 0.3 * torch.randn(
        n_in, n_in, generator=g))
    return w, x.T @ x / 256


@pytest.mark.parametrize("kind,dim,bits", [("d4", 4, 2), ("e8", 8, 2), ("d4", 4, 3)])
def test_identity_hessian_assignment_is_nearest_code_point(kind, dim, bits):
    w, _ = _problem(1)
    res = vq_quantize(w, torch.eye(32) * 0.7, bits=bits, dim=dim, codebook=kind,
                      scale_group=16)
    cb = _brute_code(kind.upper(), bits) if (kind, bits) != ("e8", 2) else (
        lattice_codebook("E8", 2))
    cb = cb - np.round(cb.mean(0) * 64) / 64  # the centred code
    s = np.repeat(res.scales.double().numpy(), 16, axis=1)
    x = (w.double().numpy() / s).reshape(-1, dim)
    d = ((x[:, None, :] - cb[None]) ** 2).sum(2)
    best = d.min(1)
    got = ((x - res.codebooks[0].double().numpy()[res.codes.long().numpy().reshape(-1)]) ** 2
           ).sum(1)
    assert np.allclose(got, best, rtol=1e-5, atol=1e-6)
    assert np.mean(res.codes.long().numpy().reshape(-1) == _index(cb, d.argmin(1))) > 0.95


def test_lattice_scales_minimise_the_weighted_error_over_the_grid():
    """Each chosen scale's Hessian-diagonal-weighted error (exact nearest code point) is
    within 3 % of the best of the documented grid (the search clips overloads radially)."""
    w, gram = _problem(2, out=8)
    res = vq_quantize(w, gram, bits=2, dim=4, codebook="d4", scale_group=16)
    h = gram.double().numpy() * 2
    hd = np.diag(h) + 0.01 * np.diag(h).mean()
    cb = lattice_codebook("D4", 2, centered=True)
    seg = w.double().numpy().reshape(8, 2, 16)
    base = np.sqrt((seg ** 2).mean(2)) / np.sqrt((cb ** 2).mean())

    def err(s, r, g):
        x = seg[r, g].reshape(-1, 4) / s
        q = cb[((x[:, None, :] - cb[None]) ** 2).sum(2).argmin(1)].reshape(-1) * s
        return float((hd[g * 16:(g + 1) * 16] * (seg[r, g] - q) ** 2).sum())

    ratios = []
    for r in range(8):
        for g in range(2):
            grid = [err(float(np.float16(base[r, g] * t)), r, g) for t in LATTICE_SCALE_GRID]
            ratios.append(err(float(res.scales[r, g]), r, g) / min(grid))
    assert max(ratios) < 1.15 and np.mean(ratios) < 1.03


def test_lattice_bits_counted_by_hand():
    w, gram = _problem(3)
    for kind, dim in (("d4", 4), ("e8", 8)):
        layer = vq_linear_from(vq_quantize(w, gram, bits=2, dim=dim, codebook=kind,
                                           scale_group=16), None)
        # codes: 16 rows x 32 weights x 2 bits; scales: 16 x 2 float16; codebook: implicit
        assert layer.lattice == kind.upper()
        assert layer.code_bits == 16 * 32 * 2 and layer.overhead_bits == 16 * 2 * 16
        assert layer.bits_per_weight == (1024 + 512) / 512
        assert layer.codes.dtype == (torch.uint8 if dim == 4 else torch.uint16)
        ref = layer.codebooks[0].double().numpy()[layer.codes.long().numpy()].reshape(16, 32)
        ref *= np.repeat(layer.scales.double().numpy(), 16, axis=1)
        assert np.allclose(layer.dequantize_weight().double().numpy(), ref, atol=1e-6)


def test_lut_per_row_levels_counted_and_nearest():
    w, _ = _problem(4, out=8, n_in=64)
    res = vq_quantize(w, torch.eye(64), bits=2, dim=1, group_rows=1)
    layer = vq_linear_from(res, None)
    assert layer.codebooks.shape == (8, 4, 1) and layer.lattice is None
    # 2 bits per weight + 4 float16 levels per row
    assert layer.code_bits + layer.overhead_bits == 8 * 64 * 2 + 8 * 4 * 16
    assert layer.bits_per_weight == 3.0
    # H = I: every weight takes the nearest of its row's 4 levels (the levels after the
    # codebook update are the means of their weights: still nearest up to ties)
    lv = res.codebooks[:, :, 0].double().numpy()
    wn = w.double().numpy()
    best = np.abs(wn[:, :, None] - lv[:, None, :]).min(2)
    got = np.abs(wn - res.weight.double().numpy())
    assert np.allclose(got, best, atol=1e-3)
    assert len(np.unique(lv[0])) == 4


def test_assign_grouped_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    cb = rng.normal(size=(4, 5, 3)).astype(np.float32)
    codes, dist = assign_grouped(x, cb, 3)
    g = np.arange(10) // 3
    d = ((x[:, None, :].astype(np.float64) - cb[g].astype(np.float64)) ** 2).sum(2)
    assert np.array_equal(codes, d.argmin(1))
    assert np.allclose(dist, d.min(1), atol=1e-5)
    with pytest.raises(ValueError, match="codebooks for 10 rows"):
        assign_grouped(x, cb, 2)
    with pytest.raises(ValueError, match="rows must be"):
        assign_grouped(x, cb, 0)


@pytest.mark.parametrize("kw,match", [
    (dict(codebook="d4", dim=2, scale_group=16), "needs dim=4"),
    (dict(codebook="e8", dim=4, scale_group=16), "needs dim=8"),
    (dict(codebook="d4", dim=4), "needs scales"),
    (dict(codebook="d4", dim=4, bits=2.5, scale_group=16), "integer bits"),
    (dict(codebook="e8", dim=8, bits=3, scale_group=16), "integer bits"),
    (dict(codebook="d4", dim=4, scale_group=16, group_rows=4), "group_rows must be None"),
    (dict(codebook="z8", dim=8, scale_group=16), "codebook"),
])
def test_bad_lattice_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        VQConfig(**kw)
    w, gram = _problem(5)
    with pytest.raises(ValueError, match=match):
        vq_quantize(w, gram, **{"bits": 2, **kw})


def test_vqlinear_lattice_checks():
    codes = torch.zeros(2, 2, dtype=torch.uint8)
    cb = torch.from_numpy(lattice_codebook("D4", 2, centered=True))[None].half()
    scales = torch.ones(2, 1, dtype=torch.float16)
    assert VQLinear(codes, cb, scales, None, 2, lattice="D4").overhead_bits == 2 * 16
    assert VQLinear(codes, cb, scales, None, 2).overhead_bits == 2 * 16 + 256 * 4 * 16
    with pytest.raises(ValueError, match="not the centred D4"):
        VQLinear(codes, cb + 1, scales, None, 2, lattice="D4")
    with pytest.raises(ValueError, match="needs scales"):
        VQLinear(codes, cb, None, None, 2, lattice="D4")
    with pytest.raises(ValueError, match="lattice must be"):
        VQLinear(codes, cb, scales, None, 2, lattice="A2")
    with pytest.raises(ValueError, match="a E8 codebook"):
        VQLinear(codes, cb, scales, None, 2, lattice="E8")


def test_pipeline_lattice_counts_codes_and_scales_only():
    model = LM.build("llama")
    cal = LM.calibration()
    q = qkern.quantize_model(copy.deepcopy(model), VQConfig(bits=2, dim=4, codebook="d4",
                                                            scale_group=64),
                             cal, progress=False)
    layers = [m for m in q.modules() if isinstance(m, VQLinear)]
    assert len(layers) == 14 and all(m.lattice == "D4" for m in layers)
    bits, n = model_bits_per_weight(q)
    assert n == sum(m.out_features * m.in_features for m in layers)
    assert bits == sum(m.out_features * m.in_features * 2 + m.scales.numel() * 16
                       for m in layers)
    with torch.no_grad():
        assert torch.isfinite(LM.output(q, cal[0])).all()
