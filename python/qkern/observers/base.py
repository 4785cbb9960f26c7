"""The observer contract: record statistics in ``forward``, turn them into a range and then into
qkern's scale / zero point (docs/numerics.md, "Scales computed from the data")."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import formats as F
from .._checks import check_float, nonfinite_message, normalize_axis
from ..quantize import quantize
from ..tensor import dequantize

GRANULARITIES = ("tensor", "channel")
_FLT_MIN = torch.finfo(torch.float32).tiny


# ------------------------------------------------------------------------- config validation
def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """An int field in ``[lo, hi]``; anything else is a ValueError naming the field."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_real(name: str, value, lo: float, hi: float, *, lo_open: bool = False,
               hi_open: bool = False) -> float:
    """A real field in the interval ``lo..hi`` (each end open or closed)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def _check_format(fmt, symmetric) -> F.Format:
    try:
        f = F.get(fmt)
    except TypeError as e:
        raise ValueError(f"fmt: {e}") from None
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if f.scale_rule in (F.SCALE_POW2_MX, F.SCALE_MEANABS):
        raise ValueError(
            f"fmt={f.name!r} takes its scale from its own rule (power-of-two MX blocks or "
            "mean|x|), not from a range: observers support integer, codebook and G.711 formats"
        )
    if not symmetric and (f.kind != "int" or f.symmetric_only):
        raise ValueError(f"fmt={f.name!r} is symmetric only: pass symmetric=True")
    if f.kind == "int" and symmetric and f.qmax == 0:
        raise ValueError(f"fmt={f.name!r} has no positive level for a symmetric range; "
                         "pass symmetric=False")
    return f


# ----------------------------------------------------------------------------------- qparams
def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, fmt, symmetric: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkern's scale (float32) and zero point (int32, None when symmetric) for the range
    ``[lo, hi]``, exactly as ``qkern.quantize`` derives them from data whose min/max are lo/hi:

    - integer, symmetric: ``scale = max(|lo|, |hi|) / qmax``;
    - integer, asymmetric: ``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``,
      ``scale = (hi' - lo') / (qmax - qmin)``, ``zp = clamp(qmin - rne(lo' / scale))``;
    - codebook / G.711: ``scale = max(|lo|, |hi|) / max_value``;
    - a zero scale becomes 1.0 and a positive one below FLT_MIN becomes FLT_MIN.

    A range whose ``hi' - lo'`` overflows float32 gets the same quotient without the overflow
    (``minmax_scale``); a scale that still does not fit float32 is a ValueError.
    """
    fmt = F.get(fmt)
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    zp = None
    if fmt.kind == "int" and not symmetric:
        lo0, hi0 = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = sanitize_scale(minmax_scale(lo0, hi0, fmt.qmax - fmt.qmin))
        zp = (fmt.qmin - torch.round(lo0 / scale)).clamp(fmt.qmin, fmt.qmax).to(torch.int32)
    else:
        qpos = float(fmt.qmax) if fmt.kind == "int" else fmt.max_value
        scale = sanitize_scale(torch.maximum(lo.abs(), hi.abs()) / qpos)
    return scale, zp


def minmax_scale(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``(hi - lo) / n`` (lo <= 0 <= hi), as csrc/core/affine.h's minmax_scale: where
    ``hi - lo`` overflows float32 on finite data, ``(hi/2 - lo/2) / (n/2)``, the same quotient
    bit for bit (halving is exact and commutes with rounding). A result that does not fit
    float32 (a 1-bit format over a range beyond FLT_MAX) is a ValueError."""
    rng = hi - lo
    scale = rng / float(n)
    over = torch.isinf(rng) & torch.isfinite(lo) & torch.isfinite(hi)
    if bool(over.any()):
        scale = torch.where(over, (hi * 0.5 - lo * 0.5) / (float(n) * 0.5), scale)
        if not bool(torch.isfinite(scale[over]).all()):
            raise ValueError(f"the range [{float(lo[over].min())}, {float(hi[over].max())}] "
                             f"over {n} steps needs a scale beyond float32's largest value")
    return scale


def sanitize_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales with zeros (an all-constant range) replaced by 1 and tiny ones raised to
    the smallest normal float, so that 1 / scale is finite."""
    scale = torch.where(scale > 0, scale.clamp_min(_FLT_MIN), torch.ones_like(scale))
    return scale.to(torch.float32)


# ------------------------------------------------------------------------------ the observer
class Observer(nn.Module):
    """Base class: ``forward(x)`` records statistics of ``x`` and returns ``x`` unchanged, so an
    observer can sit in a model while calibration data runs through it.

    ``fmt`` is a qkern format name or Format; ``granularity="tensor"`` gives one range,
    ``"channel"`` one per index along ``axis``. ``min_max_range()`` -> ``(lo, hi)`` is the common
    currency (shape ``()`` or ``(channels,)``); ``calculate_qparams()`` turns it into the scale and
    zero point ``qkern.quantize(x, fmt, scale=..., zero_point=...)`` accepts.
    """

    def __init__(self, fmt="int8", *, symmetric: bool = True, granularity: str = "tensor",
                 axis: int = 0):
        super().__init__()
        self.format = _check_format(fmt, symmetric)
        self.symmetric = symmetric
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
        self.granularity = granularity
        self.axis = check_int("axis", axis, -(2**31))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))
        self._channels: int | None = None
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- recording
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"observers take a torch.Tensor, got {type(x).__name__}")
        check_float(x)
        if x.numel() == 0:
            return x
        with torch.no_grad():
            xd = x.detach()
            if not torch.isfinite(xd).all():
                raise ValueError(nonfinite_message(xd, "observed tensor"))
            self._observe(self._rows(xd))
            self.num_batches += 1
            self._cached = None
        return x

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``(channels, n)`` view of the data (one row for per-tensor)."""
        if self.granularity == "tensor":
            return x.reshape(1, -1).float()
        if x.dim() == 0:
            raise ValueError("granularity='channel' needs a tensor with at least 1 dimension")
        ax = normalize_axis(self.axis, x.dim())
        c = x.shape[ax]
        if self._channels is not None and c != self._channels:
            raise ValueError(f"observed tensor has {c} channels along axis {self.axis}; "
                             f"this observer has seen {self._channels}")
        self._channels = c
        return x.movedim(ax, 0).reshape(c, -1).float()

    def _observe(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi), each of shape (channels,) (one entry for per-tensor)."""
        raise NotImplementedError

    def _reset_stats(self) -> None:
        raise NotImplementedError

    # -- results
    def _check_seen(self) -> None:
        if int(self.num_batches) == 0:
            raise RuntimeError(
                f"{type(self).__name__}: observer has seen no data: run calibration first"
            )

    def min_max_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen range ``(lo, hi)`` as float32 tensors (shape () or (channels,))."""
        self._check_seen()
        if self._cached is None:
            lo, hi = self._range()
            self._cached = (lo.float().cpu(), hi.float().cpu())
        lo, hi = self._cached
        if self.granularity == "tensor":
            return lo.reshape(()).clone(), hi.reshape(()).clone()
        return lo.clone(), hi.clone()

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale float32, zero_point int32 or None when symmetric), see qparams_from_range."""
        lo, hi = self.min_max_range()
        return qparams_from_range(lo, hi, self.format, self.symmetric)

    def quant_kwargs(self) -> dict:
        """Keyword arguments for ``qkern.quantize`` that apply this observer's parameters."""
        scale, zp = self.calculate_qparams()
        kw = {"granularity": self.granularity, "symmetric": self.symmetric, "scale": scale}
        if self.granularity == "channel":
            kw["axis"] = self.axis
        if zp is not None:
            kw["zero_point"] = zp
        return kw

    def quantize(self, x: torch.Tensor, **kw):
        """``qkern.quantize(x, fmt, ...)`` with this observer's scale and zero point."""
        return quantize(x, self.format, **self.quant_kwargs(), **kw)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize ``x`` with this observer's parameters (no gradient)."""
        return dequantize(self.quantize(x))

    def reset(self) -> None:
        """Forget everything observed."""
        self.num_batches.zero_()
        self._channels = None
        self._cached = None
        self._reset_stats()

    def extra_repr(self) -> str:
        s = f"fmt={self.format.name}, symmetric={self.symmetric}, granularity={self.granularity}"
        return s + (f", axis={self.axis}" if self.granularity == "channel" else "")


# ---------------------------------------------------------------------------- sample storage
class SampleStore:
    """Observed data kept for exact statistics, at most ``max_samples`` elements: every column
    (one element per channel) gets a random key and the columns with the smallest keys stay, a
    uniform sample without replacement of everything seen (all of it while it fits)."""

    def __init__(self, max_samples: int, seed: int):
        self.max_samples = max_samples
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.data: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.seen = 0
        self.gen = torch.Generator().manual_seed(self.seed)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        keys = torch.rand(rows.shape[1], generator=self.gen)
        self.seen += rows.shape[1]
        if self.data is None:
            data, allk = rows.clone(), keys
        else:
            data, allk = torch.cat([self.data, rows], 1), torch.cat([self.keys, keys])
        cap = max(1, self.max_samples // rows.shape[0])
        if data.shape[1] > cap:
            keep = torch.topk(allk, cap, largest=False).indices.sort().values
            data, allk = data[:, keep].contiguous(), allk[keep]
        self.data, self.keys = data, allk

    @property
    def complete(self) -> bool:
        """Whether every observed column is still stored."""
        return self.data is not None and self.data.shape[1] == self.seen
