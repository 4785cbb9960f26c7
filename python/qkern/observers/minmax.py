"""Running min/max and its exponential moving average (torch.ao's definitions)."""

from __future__ import annotations

import torch

from .base import Observer, check_real


def _ema(m: torch.Tensor, cur: torch.Tensor, c: float) -> torch.Tensor:
    """``m + c * (cur - m)`` in float32; where ``cur - m`` overflows on finite values, the
    same formula in float64 rounded to float32 (a convex combination of two finite float32
    values, so finite)."""
    out = m + c * (cur - m)
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        m64, cur64 = m.double(), cur.double()
        out = torch.where(bad, (m64 + c * (cur64 - m64)).float(), out)
    return out


class MinMaxObserver(Observer):
    """The range is the smallest and largest value seen (per channel with granularity
    ``"channel"``)."""

    def __init__(self, fmt="int8", **kw):
        super().__init__(fmt, **kw)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def _update(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> None:
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = cur_min, cur_max
        else:
            self.min_val = torch.minimum(self.min_val, cur_min)
            self.max_val = torch.maximum(self.max_val, cur_max)

    def _observe(self, rows: torch.Tensor) -> None:
        self._update(*torch.aminmax(rows, dim=1))

    def _range(self):
        return self.min_val, self.max_val

    def _reset_stats(self) -> None:
        self.min_val, self.max_val = torch.empty(0), torch.empty(0)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """The first batch's min/max, then ``m += c * (batch_m - m)`` per batch (float32; float64
    where ``batch_m - m`` overflows), with ``c = averaging_constant`` (0.01 as in torch.ao)."""

    def __init__(self, fmt="int8", *, averaging_constant: float = 0.01, **kw):
        super().__init__(fmt, **kw)
        self.averaging_constant = check_real("averaging_constant", averaging_constant, 0.0, 1.0,
                                             lo_open=True)

    def _update(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> None:
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = cur_min, cur_max
            return
        self.min_val = _ema(self.min_val, cur_min, self.averaging_constant)
        self.max_val = _ema(self.max_val, cur_max, self.averaging_constant)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", averaging_constant={self.averaging_constant}"
