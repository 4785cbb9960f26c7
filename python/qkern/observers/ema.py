"""Range smoothing across calibration batches: each batch's min / max (per tensor or per
channel) averaged over the batches, either as an exponential moving average with Adam's bias
correction (:class:`EMAMinMaxObserver`) or as the plain mean of the batches' ranges
(:class:`RunningMeanMinMaxObserver`). Where :class:`~qkern.observers.MinMaxObserver` keeps the
extreme of all batches (one outlier batch sets the range for good), these follow the typical
batch; docs/calibration_extras.md measures when that pays."""

from __future__ import annotations

import torch

from .base import Observer, check_real

__all__ = ["EMAMinMaxObserver", "RunningMeanMinMaxObserver"]


class EMAMinMaxObserver(Observer):
    """Bias-corrected exponential moving average of the batches' min and max:

        m_0 = 0,   m_t = beta * m_{t-1} + (1 - beta) * batch_t,   range_t = m_t / (1 - beta^t)

    (Kingma & Ba's correction: without it the zero start pulls the first batches' range
    toward 0; with it ``range_1`` is the first batch's min / max and every ``range_t`` is a
    weighted mean of the batches seen, weights ``beta^(t-i)``). ``bias_correction=False``
    gives the raw ``m_t``. The accumulators are float64 (so the correction of a long run does
    not lose the last bits); the range is returned in float32.

    >>> import torch, qkern
    >>> obs = qkern.observers.make_observer("ema", fmt="int8", beta=0.5)
    >>> for b in (torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 4.0])):
    ...     _ = obs(b)
    >>> [round(float(v), 4) for v in obs.min_max_range()]   # (0.5*-1 + -3) / 1.5 ...
    [-2.3333, 3.3333]
    """

    def __init__(self, fmt="int8", *, beta: float = 0.9, bias_correction: bool = True, **kw):
        super().__init__(fmt, **kw)
        self.beta = check_real("beta", beta, 0.0, 1.0, hi_open=True)
        if not isinstance(bias_correction, bool):
            raise ValueError(f"bias_correction must be a bool, got "
                             f"{type(bias_correction).__name__}")
        self.bias_correction = bias_correction
        self.register_buffer("m_min", torch.empty(0, dtype=torch.float64))
        self.register_buffer("m_max", torch.empty(0, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = torch.aminmax(rows, dim=1)
        if self.m_min.numel() == 0:
            self.m_min = torch.zeros_like(lo, dtype=torch.float64)
            self.m_max = torch.zeros_like(hi, dtype=torch.float64)
        b = self.beta
        self.m_min = b * self.m_min + (1.0 - b) * lo.double()
        self.m_max = b * self.m_max + (1.0 - b) * hi.double()
        self.steps += 1

    def _range(self):
        c = 1.0 - self.beta ** int(self.steps) if self.bias_correction else 1.0
        return (self.m_min / c).float(), (self.m_max / c).float()

    def _reset_stats(self) -> None:
        self.m_min = torch.empty(0, dtype=torch.float64)
        self.m_max = torch.empty(0, dtype=torch.float64)
        self.steps.zero_()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", beta={self.beta}, bias_correction={self.bias_correction}"


class RunningMeanMinMaxObserver(Observer):
    """The mean over the batches of each batch's min and max (the bias-corrected EMA's limit
    ``beta -> 1``: every batch weighs the same), accumulated in float64.

    >>> import torch, qkern
    >>> obs = qkern.observers.make_observer("running_mean", fmt="int8")
    >>> for b in (torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 4.0])):
    ...     _ = obs(b)
    >>> [float(v) for v in obs.min_max_range()]
    [-2.0, 3.0]
    """

    def __init__(self, fmt="int8", **kw):
        super().__init__(fmt, **kw)
        self.register_buffer("sum_min", torch.empty(0, dtype=torch.float64))
        self.register_buffer("sum_max", torch.empty(0, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = torch.aminmax(rows, dim=1)
        if self.sum_min.numel() == 0:
            self.sum_min = torch.zeros_like(lo, dtype=torch.float64)
            self.sum_max = torch.zeros_like(hi, dtype=torch.float64)
        self.sum_min = self.sum_min + lo.double()
        self.sum_max = self.sum_max + hi.double()
        self.steps += 1

    def _range(self):
        t = float(int(self.steps))
        return (self.sum_min / t).float(), (self.sum_max / t).float()

    def _reset_stats(self) -> None:
        self.sum_min = torch.empty(0, dtype=torch.float64)
        self.sum_max = torch.empty(0, dtype=torch.float64)
        self.steps.zero_()
