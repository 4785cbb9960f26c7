"""Observers that need the data itself, kept in a bounded uniform sample: percentile and the
MSE-optimal clipping search."""

from __future__ import annotations

import numpy as np
import torch

from ..quantize import quantize
from ..tensor import dequantize
from .base import Observer, SampleStore, check_int, check_real, qparams_from_range


def percentile_rows(rows: torch.Tensor, p: float) -> torch.Tensor:
    """Per-row percentile ``p`` (0..100) with linear interpolation between order statistics at
    position ``p/100 * (n - 1)`` (numpy.percentile's default), computed in float64."""
    s = rows.double().sort(dim=1).values
    pos = p / 100.0 * (s.shape[1] - 1)
    i = min(int(np.floor(pos)), s.shape[1] - 1)
    j = min(i + 1, s.shape[1] - 1)
    frac = pos - i
    return s[:, i] + frac * (s[:, j] - s[:, i])


class _Sampled(Observer):
    def __init__(self, fmt, *, max_samples: int, seed: int, **kw):
        super().__init__(fmt, **kw)
        check_int("max_samples", max_samples, 1)
        check_int("seed", seed, 0)
        self.samples = SampleStore(max_samples, seed)

    def _observe(self, rows: torch.Tensor) -> None:
        self.samples.add(rows)

    def _reset_stats(self) -> None:
        self.samples.reset()


class PercentileObserver(_Sampled):
    """Clips the tails: symmetric, ``amax`` = the ``percentile``-th percentile of ``|x|`` and the
    range ``(-amax, amax)``; asymmetric, ``(P(100 - percentile), P(percentile))`` of ``x``.
    Exact over everything observed while it fits in ``max_samples`` elements, else over a
    uniform sample of that size."""

    def __init__(self, fmt="int8", *, percentile: float = 99.99, max_samples: int = 2**22,
                 seed: int = 0, **kw):
        super().__init__(fmt, max_samples=max_samples, seed=seed, **kw)
        self.percentile = check_real("percentile", percentile, 50.0, 100.0, lo_open=True)

    def _range(self):
        data = self.samples.data
        if self.symmetric:
            amax = percentile_rows(data.abs(), self.percentile)
            return -amax, amax
        return (percentile_rows(data, 100.0 - self.percentile),
                percentile_rows(data, self.percentile))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", percentile={self.percentile}"


class MSEObserver(_Sampled):
    """The min/max range shrunk by the clip ratio ``r`` (``(r*lo, r*hi)``, per channel) that
    minimizes the mean squared error of qkern's quantize -> dequantize over the observed data
    (or a uniform sample of ``max_samples`` elements). Candidates: ``r = 1`` first (the min/max
    range, so never worse than MinMaxObserver), then ``num_candidates - 1`` more, evenly spaced
    down to ``min_ratio``; a candidate replaces the best only if its error is strictly smaller."""

    def __init__(self, fmt="int8", *, num_candidates: int = 100, min_ratio: float = 0.2,
                 max_samples: int = 2**22, seed: int = 0, **kw):
        super().__init__(fmt, max_samples=max_samples, seed=seed, **kw)
        self.num_candidates = check_int("num_candidates", num_candidates, 1, 10_000)
        self.min_ratio = check_real("min_ratio", min_ratio, 0.0, 1.0, lo_open=True,
                                    hi_open=True)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = torch.aminmax(rows, dim=1)
        if self.min_val.numel():
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.min_val, self.max_val = lo, hi
        super()._observe(rows)

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self.min_val, self.max_val = torch.empty(0), torch.empty(0)

    @property
    def ratios(self) -> np.ndarray:
        """The clip ratios tried, 1.0 first."""
        return np.linspace(1.0, self.min_ratio, self.num_candidates)

    def quantization_mse(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Per-channel (or one-element) float64 MSE of quantizing the stored samples with the
        parameters of the range ``(lo, hi)``."""
        data = self.samples.data
        scale, zp = qparams_from_range(lo.reshape(-1), hi.reshape(-1), self.format,
                                       self.symmetric)
        qt = quantize(data, self.format, granularity="channel", axis=0,
                      symmetric=self.symmetric, scale=scale, zero_point=zp)
        return (dequantize(qt).double() - data.double()).square().mean(dim=1)

    def _range(self):
        lo, hi = self.min_val.cpu(), self.max_val.cpu()
        best_lo, best_hi = lo.clone(), hi.clone()
        best = self.quantization_mse(lo, hi)
        self.best_ratio = torch.ones(lo.shape, dtype=torch.float64)
        for r in self.ratios[1:]:
            clo, chi = lo * float(r), hi * float(r)
            err = self.quantization_mse(clo, chi)
            better = err < best
            best = torch.where(better, err, best)
            best_lo = torch.where(better, clo, best_lo)
            best_hi = torch.where(better, chi, best_hi)
            self.best_ratio[better] = float(r)
        return best_lo, best_hi

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", num_candidates={self.num_candidates}, min_ratio={self.min_ratio}")
