"""How GPTVQ (:mod:`.vq`) starts its codebooks and scales: per-segment maximum scales, the
Hessian-weighted k-means codebooks of a learned codebook, and the searched scales of a fixed
lattice code."""

from __future__ import annotations

import torch

from ...vq.kmeans import KMeans
from ...vq.lattice import LatticeQuantizer, lattice_codebook

__all__ = ["LATTICE_SCALE_GRID", "codebooks_kmeans", "lattice_scales", "max_scales"]

#: multipliers of ``rms(segment) / rms(codebook)`` tried for a lattice codebook's scales
LATTICE_SCALE_GRID = tuple(0.5 * 4 ** (i / 20) for i in range(21))


def max_scales(w: torch.Tensor, scale_group: int | None) -> torch.Tensor | None:
    """Per row and segment: the largest magnitude, float16 (1 where the segment is zero)."""
    if scale_group is None:
        return None
    s = w.reshape(w.shape[0], -1, scale_group).abs().amax(2).to(torch.float16)
    return torch.where(s > 0, s, torch.ones_like(s))


def codebooks_kmeans(wn: torch.Tensor, hdiag: torch.Tensor, sfull: torch.Tensor | None, dim: int,
               k: int, rows: int, iters: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """One weighted-k-means codebook per group of ``rows`` rows of the normalized weight
    ``wn``, rounded to the storage ``dtype``."""
    out, n_in = wn.shape
    vw = hdiag.reshape(-1, dim).mean(1).clamp_min(1e-12)        # (in / dim,)
    books = []
    for r0 in range(0, out, rows):
        vec = wn[r0:r0 + rows].reshape(-1, dim).numpy()
        wt = vw.repeat(min(rows, out - r0))
        if sfull is not None:
            wt = wt * sfull[r0:r0 + rows, ::dim].reshape(-1).square()
        km = KMeans(d=dim, k=k, n_iter=iters, seed=seed, max_points_per_centroid=1 << 30)
        km.train(vec, weights=wt.numpy())
        books.append(torch.from_numpy(km.centroids))
    return torch.stack(books).to(dtype)


def lattice_scales(w0, hdiag, scale_group, codebook, bits, cb):
    """Per row and segment of ``scale_group`` columns, the float16 scale of
    :data:`LATTICE_SCALE_GRID` times ``rms(segment) / rms(cb)`` minimizing the weighted error
    ``sum_j H_jj (w_j - s q_j)^2``, ``q`` the segment's blocks divided by ``s`` rounded to the
    code (:class:`LatticeQuantizer`'s nearest point with the radial clip, on the centred code:
    shifted by the centring offset and back)."""
    out, n_in = w0.shape
    dim = cb.shape[1]
    lq = LatticeQuantizer(dim, codebook.upper(), bits, scale=1.0)
    off = lattice_codebook(codebook.upper(), bits)[0] - cb[0].double().numpy()
    seg = w0.reshape(out, -1, scale_group)
    base = seg.square().mean(2).sqrt() / float(cb.square().mean().sqrt())
    base = torch.where(base > 0, base, torch.ones_like(base))
    best = torch.full_like(base, float("inf"))
    scales = torch.ones_like(base, dtype=torch.float16)
    for t in LATTICE_SCALE_GRID:
        s16 = (base * t).to(torch.float16)
        s16 = torch.where(s16 > 0, s16, torch.ones_like(s16))
        x = (seg / s16.float()[:, :, None]).reshape(-1, dim).double().numpy() + off
        q = torch.from_numpy(lq.decode(lq.encode(x)) - off).float()
        err = (w0 - q.reshape(out, n_in) * s16.float().repeat_interleave(scale_group, 1))
        err = (err.square() * hdiag).reshape(out, -1, scale_group).sum(2)
        better = err < best
        best = torch.where(better, err, best)
        scales = torch.where(better, s16, scales)
    return scales
