"""A GEMM over a weight decoded a chunk of rows at a time into a buffer that stays allocated:
what the float-activation kernels without a fast many-row path (``gemm_vq``, ``gemm_lut4``)
run for many rows of ``x`` (prefill).

``chunked_matmul(x, decode, N, K, bias, step)``: ``y = x @ W^T (+ bias)`` with ``decode(n0,
n1, w)`` writing rows ``[n0, n1)`` of ``W`` (float32) into the buffer address ``w``, chunks of
about :data:`CHUNK_BYTES` (a multiple of ``step`` rows, at least one step), each multiplied by
``torch.mm``. Decoding the whole weight into a fresh tensor would pay its first-touch page
faults on every call (as much again as the decode itself for a 4096 x 4096 layer); a chunk is
also still in the cache for its GEMM. The buffers are per thread and grow to the largest chunk
asked for (8 MiB by default, plus ``M`` x chunk-rows floats of output).

Numerics: ``torch.mm``'s float32 sums (its own blocking and order), so results agree with
``x @ W^T`` to float32 rounding, as the fused kernels' do; no autograd (frozen weights).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

__all__ = ["CHUNK_BYTES", "chunked_matmul"]

#: bytes of decoded weight per chunk
CHUNK_BYTES = 8 << 20
_SCRATCH = threading.local()  # per thread: "w" (decoded rows), "y" (a chunk's output)


def _scratch(name: str, n: int) -> torch.Tensor:
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32)
        setattr(_SCRATCH, name, buf)
    return buf[:n]


@torch.no_grad()
def chunked_matmul(x: torch.Tensor, decode: Callable[[int, int, int], None], N: int, K: int,
                   bias: torch.Tensor | None, step: int = 1) -> torch.Tensor:
    """``x`` (M, K) float32 contiguous, ``bias`` None or (N,) float32 -> (M, N) float32
    (module docstring)."""
    m = x.shape[0]
    if K == 0 or N == 0:
        y = torch.zeros((m, N), dtype=torch.float32)
        return y if bias is None else y.add_(bias)
    rows = max(step, CHUNK_BYTES // (4 * max(K, 1)) // step * step)
    y = torch.empty((m, N), dtype=torch.float32)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = _scratch("w", (n1 - n0) * K)
        decode(n0, n1, w.data_ptr())
        wt = w.view(n1 - n0, K).t()
        if n1 - n0 == N:  # one chunk: straight into y
            return torch.mm(x, wt, out=y) if bias is None else torch.addmm(bias, x, wt, out=y)
        part = _scratch("y", m * (n1 - n0)).view(m, n1 - n0)
        torch.mm(x, wt, out=part)
        y[:, n0:n1] = part
    return y if bias is None else y.add_(bias)
