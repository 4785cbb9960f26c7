"""LLM.int8's mixed 8/16-bit matmul (Dettmers et al. 2022, "LLM.int8()", eq. 3 and 4):
``qkern::gemm_w8a8_mixed(x, packed_w, w_scale, bias, N, K, threshold)``.

The outlier feature dimensions of one call are the columns of ``x`` (M, K) holding any
``|x_ij| >= threshold`` (threshold 0: every column; inf: none). Then

    y = S_x * (X_i8[:, ~O] @ W_i8[:, ~O]^T) * s_w  +  X[:, O] @ W_dq[:, O]^T  (+ bias)

- the first term is ``gemm_w8a8`` (csrc/cpu/gemm/w8: AVX2 / AVX-512 VNNI int8 dot products,
  int32 accumulation) on ``x`` with its outlier columns set to 0: each row quantized to int8
  with scale ``max_{j not in O} |x_ij| / 127`` (vector-wise, per token), so the outliers do not
  stretch the rows' scales;
- the second is a float32 matmul of the outlier columns of ``x`` with the same columns of the
  weight dequantized from its int8 codes (``codes * w_scale``, as bitsandbytes does): the
  weight stays int8, only the few outlier columns (gathered from the packed layout, O(N |O|))
  are decoded per call. bitsandbytes runs this part in float16; here it is float32.

The weight is the ``pack_w8`` buffer of int8 codes with one scale per output channel
(row-wise absmax / 127). NaN or Inf in ``x`` raise :class:`NonFiniteError`, like gemm_w8a8.
The result has ``x``'s dtype. The gradient (ops/autograd.py) is that of ``x @ W_dq^T``
(straight-through for the int8 columns, exact for the float ones).
"""

from __future__ import annotations

import math

import torch

from . import checks
from .cpu import NonFiniteError
from .schemas import LIB
from .w8 import gemm_w8a8

__all__ = ["gather_w8_columns", "gemm_w8a8_mixed", "outlier_columns"]


def outlier_columns(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """The indices (int64, ascending) of the columns of ``x2`` (M, K) with any
    ``|x_ij| >= threshold``; raises NonFiniteError when ``x2`` holds NaN or Inf."""
    if x2.shape[0] == 0 or x2.shape[1] == 0:
        return torch.zeros(0, dtype=torch.long)
    colmax = x2.abs().amax(0)
    if not bool(torch.isfinite(colmax).all()):
        raise NonFiniteError("gemm_w8a8_mixed: x contains NaN or Inf")
    return torch.nonzero(colmax >= threshold).reshape(-1)


def gather_w8_columns(packed_w: torch.Tensor, N: int, K: int, cols: torch.Tensor
                      ) -> torch.Tensor:
    """The int8 codes ``W[:, cols]^T`` (len(cols), N) read from the ``pack_w8`` layout
    (csrc/cpu/gemm/w8/api.h: packed[b, s, j, t] = codes[16 b + j][4 s + t]), O(N len(cols))."""
    nb, kp = (N + 15) // 16, (K + 3) // 4 * 4
    # one int32 = the 4 codes (k = 4s .. 4s+3) of one row: pick the step, shift out code t
    words = packed_w.contiguous().view(torch.int32).reshape(nb, kp // 4, 16)
    sel = words.index_select(1, cols // 4)  # (nb, L, 16)
    codes = (sel >> (8 * (cols % 4)).reshape(1, -1, 1)).to(torch.int8)  # low byte, wrapped
    return codes.transpose(0, 1).reshape(len(cols), nb * 16)[:, :N]


def gemm_w8a8_mixed(x, packed_w, w_scale, bias, N, K, threshold):
    checks.gemm_w8("gemm_w8a8_mixed", x, packed_w, w_scale, bias, N, K)
    checks.threshold_tensor("gemm_w8a8_mixed", threshold)
    thr = float(threshold.reshape(()))
    if math.isnan(thr) or thr < 0:
        raise ValueError(f"gemm_w8a8_mixed: threshold must be >= 0 (inf: no outliers), got {thr}")
    m = math.prod(x.shape[:-1])
    x2 = x.detach().reshape(m, K).float()
    cols = outlier_columns(x2, thr)
    if cols.numel() == 0:
        return gemm_w8a8(x, packed_w, w_scale, bias, N, K)
    xr = x2.clone()
    xr[:, cols] = 0.0  # the int8 part sees no outlier column (nor its scale)
    y = gemm_w8a8(xr, packed_w, w_scale, bias, N, K)
    sw = w_scale.detach().reshape(1, N).float()
    w_out = gather_w8_columns(packed_w.detach(), N, K, cols).float() * sw  # W_dq[:, O]^T
    y.addmm_(x2[:, cols], w_out)
    return y.reshape(*x.shape[:-1], N).to(x.dtype)


LIB.impl("gemm_w8a8_mixed", gemm_w8a8_mixed, "CPU")
