"""Range estimation for calibration: observers record statistics of the tensors flowing through
them and turn them into qkern's scale / zero point.

    obs = qkern.observers.make_observer("mse", fmt="int8", granularity="channel")
    for batch in data:
        obs(batch)
    scale, zero_point = obs.calculate_qparams()
    q = qkern.quantize(x, "int8", granularity="channel", scale=scale)   # or obs.quantize(x)
"""

from __future__ import annotations

from .base import Observer, qparams_from_range
from .ema import EMAMinMaxObserver, RunningMeanMinMaxObserver
from .histogram import HistogramObserver, KLObserver, kl_threshold_bin, l2_range_search
from .lsq import LSQObserver
from .minmax import MinMaxObserver, MovingAverageMinMaxObserver
from .sampled import MSEObserver, PercentileObserver

__all__ = [
    "OBSERVERS",
    "EMAMinMaxObserver",
    "HistogramObserver",
    "KLObserver",
    "LSQObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "RunningMeanMinMaxObserver",
    "kl_threshold_bin",
    "l2_range_search",
    "make_observer",
    "qparams_from_range",
]

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
    "histogram": HistogramObserver,
    "lsq": LSQObserver,
    "ema": EMAMinMaxObserver,
    "running_mean": RunningMeanMinMaxObserver,
}


def make_observer(name: str, **kw) -> Observer:
    """``OBSERVERS[name](**kw)``; an unknown name is a ValueError listing the known ones."""
    if not isinstance(name, str) or name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")
    return OBSERVERS[name](**kw)
