"""int8-weight matmuls: ``qkern::pack_w8``, ``qkern::gemm_w8a8`` and ``qkern::gemm_w8a16``.

Weights are (N, K) int8 codes with one float32 scale per output channel (row), packed once by
``pack_w8`` into the kernels' blocked layout (``csrc/cpu/gemm/w8/api.h``): a flat int8 tensor of
``w8_packed_nbytes(N, K)`` bytes. Exact definitions: docs/numerics.md, "int8 matmul".

- ``gemm_w8a8``: each row of ``x`` is quantized to int8 on the fly (scale = amax / 127, codes
  [-127, 127], round-nearest-even), int32 accumulation, ``(acc * sx[m]) * w_scale[n] + bias[n]``.
- ``gemm_w8a16``: ``x @ (codes * w_scale)^T + bias`` with float32 accumulation.

``x`` is (..., K) float32, bfloat16 or float16 (computed in float32); the result is
(..., N) in ``x.dtype``.
"""

from __future__ import annotations

import math

import torch

from .. import _C
from . import checks
from .checks import w8_packed_nbytes as packed_nbytes
from .cpu import NonFiniteError
from .raw import contig, ptr
from .schemas import LIB

__all__ = ["gemm_s8s8_s32", "gemm_w8a8", "gemm_w8a16", "pack_w8", "packed_nbytes", "run_gemm_w8",
           "unpack_w8"]


def _out_shape(x: torch.Tensor, N: int) -> tuple:
    return (*x.shape[:-1], N)


def gemm_s8s8_s32(xq, packed_w, N, K):
    """acc (..., N) int32 = xq (..., K) int8 @ codes^T, exact; codes in [-127, 127]."""
    checks.gemm_s8s8(xq, packed_w, N, K)
    m = math.prod(xq.shape[:-1])
    acc = _C.gemm_s8s8_s32(xq.detach().contiguous().reshape(-1).numpy(),
                           packed_w.detach().contiguous().numpy(), m, N, K)
    return torch.from_numpy(acc).view(_out_shape(xq, N))


def pack_w8(codes):
    checks.w8_codes(codes)
    n, k = codes.shape
    return torch.from_numpy(_C.pack_w8(codes.detach().contiguous().reshape(-1).numpy(), n, k))


def unpack_w8(packed_w: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The (N, K) codes back from ``pack_w8`` (not an op: a test and debugging helper)."""
    return torch.from_numpy(_C.unpack_w8(packed_w.contiguous().numpy(), N, K)).view(N, K)


def _gemm(a8: bool, x, packed_w, w_scale, bias, N, K):
    checks.gemm_w8("gemm_w8a8" if a8 else "gemm_w8a16", x, packed_w, w_scale, bias, N, K)
    xf, w = contig(x, torch.float32), packed_w.detach().contiguous()
    sw, b = contig(w_scale, torch.float32), contig(bias, torch.float32)
    return run_gemm_w8(a8, xf, w, sw, b, N, K).to(x.dtype)


def run_gemm_w8(a8: bool, xf, w, sw, b, N, K):
    """The CPU body of ``gemm_w8a8`` / ``gemm_w8a16`` on checked, contiguous arguments (xf
    float32 (..., K)); float32 out."""
    m = math.prod(xf.shape[:-1])
    if K == 0 or m == 0 or N == 0:  # nothing to read: y = 0 * sw (+ bias), as defined
        y = torch.zeros(_out_shape(xf, N), dtype=torch.float32) * sw
        return y if b is None else y + b
    if a8:
        checks.int8_act_bound_x("gemm_w8a8", xf, K, "K")
    y = torch.empty(_out_shape(xf, N), dtype=torch.float32)
    bad = _C.gemm_w8_raw(a8, ptr(xf), m, ptr(w), ptr(sw), ptr(b), N, K, ptr(y))
    if bad:
        raise NonFiniteError("gemm_w8a8: x contains NaN or Inf")
    return y


def gemm_w8a8(x, packed_w, w_scale, bias, N, K):
    return _gemm(True, x, packed_w, w_scale, bias, N, K)


def gemm_w8a16(x, packed_w, w_scale, bias, N, K):
    return _gemm(False, x, packed_w, w_scale, bias, N, K)


for _name, _fn in {"pack_w8": pack_w8, "gemm_w8a8": gemm_w8a8, "gemm_w8a16": gemm_w8a16,
                   "gemm_s8s8_s32": gemm_s8s8_s32}.items():
    LIB.impl(_name, _fn, "CPU")
