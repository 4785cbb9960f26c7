"""Input validation shared by the public functions: clear exceptions naming the argument."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

try:  # the optional CUDA kernels (built when nvcc was found)
    from . import _cuda  # noqa: F401
except ImportError:
    HAS_CUDA_KERNELS = False
else:
    HAS_CUDA_KERNELS = True


def as_tensor(x, name: str = "x") -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def check_float(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float16 or bfloat16), got {x.dtype}"
        )


def check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu":
        return
    if x.device.type == "cuda":
        if not HAS_CUDA_KERNELS:
            raise RuntimeError(
                "x is a CUDA tensor but qkern was built without its CUDA kernels (qkern._cuda "
                "is missing): rebuild with nvcc available (QKERN_CUDA=ON) or move x to the CPU"
            )
        return
    raise RuntimeError(f"qkern has no kernels for device {x.device}")


def nonfinite_message(x: torch.Tensor, name: str = "x") -> str:
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist()) if count else ()
    return (
        f"{name} contains {count} NaN/Inf value{'s' if count != 1 else ''}; "
        f"the first at index {first}; quantization needs finite data"
    )


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for a tensor with {ndim} dimensions")
    return int(axis) % ndim


def check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # python/qkern/


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside the qkern package (the user's
    line), however deep inside qkern the warning is raised."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
