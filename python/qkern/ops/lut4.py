"""qkern::gemm_lut4: fused matmul with 4-bit codebook weights (nf4, fp4_e2m1, fp4_bnb or any
16-entry table).

``y = x @ W^T (+ bias)`` with ``W[n, k] = table[codes[n, k]] * scales[n, k // group_size]``,
each weight decoded exactly as ``dequantize_lut`` (one float32 product) and accumulated in
float32 (FMA and partial sums on AVX2, so paths agree to float32 rounding, not bit for bit).

Layout (``pack_weight``): each row of codes is an LSB-first nibble stream, ``packed[n, k // 2]``
holding element ``k`` in its low nibble (even ``k``) or high nibble (odd ``k``); scales are
float32 ``(N, K // group_size)``.

``qkern::gemm_lut4_dq`` takes double-quantized scales instead (``pack_weight_dq``, from a
QTensor quantized with ``double_quant=True``): one int8 code per block (row-major over
``(N, K // group_size)``), a float32 ``scale2`` per ``dq_group`` blocks and a float32 ``mean``
(a 1-element tensor); the kernel rebuilds block ``b``'s scale as
``max(float32(qscales[b] * scale2[b // dq_group]) + mean, FLT_MIN)`` in float32, exactly as
``qkern.quantize.double_quantize_scales`` dequantizes it, so the weights are the same bits.
"""

from __future__ import annotations

import torch

from .. import _C
from . import checks
from .decoded import chunked_matmul
from .raw import contig, ptr
from .schemas import LIB

__all__ = ["cpu_group_error", "cuda_group_error", "decode_weight", "decoded_min_rows",
           "dq_scales", "gemm_lut4", "gemm_lut4_dq", "group_error", "pack_weight",
           "pack_weight_dq", "run_decoded", "run_gemm_lut4", "run_gemm_lut4_dq",
           "use_decoded"]

# The AVX2 GEMM decodes W in tiles of 512 columns (csrc/cpu/gemm/lut4/avx2.cpp kKc), a group at
# a time, and its GEMV reads 16 codes at a time: safe for groups that are multiples of 16
# dividing 512. The CUDA kernels need multiples of 32.
TILE_COLUMNS = 512


def cpu_group_error(k: int, group_size: int) -> str | None:
    """Why the CPU op cannot take ``group_size`` with K = ``k`` (None when it can): a multiple
    of 16 dividing both K and 512 (16, 32, 64, 128, 256, 512), what the AVX2 paths read safely."""
    if not isinstance(group_size, int) or group_size <= 0:
        return f"group_size must be positive, got {group_size!r}"
    if k % group_size:
        return f"group_size {group_size} does not divide K = {k}"
    if group_size % 16 or TILE_COLUMNS % group_size:
        return (f"group_size must be a multiple of 16 dividing {TILE_COLUMNS} (16, 32, 64, 128, "
                f"256, 512), got {group_size}")
    return None


def cuda_group_error(k: int, group_size: int) -> str | None:
    """Why the CUDA kernels cannot take ``group_size`` (None when they can): a positive
    multiple of 32 dividing K."""
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32:
        return (f"the CUDA kernels need group_size a positive multiple of 32 (32, 64, 128), "
                f"got {group_size}")
    if k % group_size:
        return f"group_size {group_size} does not divide K = {k}"
    return None


def group_error(k: int, group_size: int) -> str | None:
    """Why ``pack_weight`` (and so QuantLinear's lut4 kernels) cannot take ``group_size`` with
    K = ``k`` (None when it can): a group every device takes, 32, 64, 128, 256 or 512."""
    return cuda_group_error(k, group_size) or cpu_group_error(k, group_size)


#: the fewest rows of x for which the CPU ops decode the weight by chunks for ``torch.mm``
#: (:func:`run_decoded`) instead of running the fused kernel, by ISA: there the decode (a few
#: ms per 4096 x 4096 layer) costs less than the fused kernel's extra time over torch's GEMM.
#: Measured on an AVX2-only EPYC, 2 threads, 4096 x 4096: M = 64 fused 21.1 / decoded 29.6 ms,
#: M = 256 87.2 / 70.5, M = 512 154.1 / 107.9 (fp32 22.0 / 70.1 / 108.6); on AVX-512 the fused
#: GEMM ran at 0.64-0.77x torch's fp32 at prefill (docs/speed.md)
DECODED_MIN_ROWS = {"scalar": 32, "avx2": 128, "avx512": 128, "amx": 128}


def decoded_min_rows() -> int:
    """:data:`DECODED_MIN_ROWS` of the active ISA."""
    return DECODED_MIN_ROWS.get(_C.get_isa(), 128)


def use_decoded(m: int) -> bool:
    """Whether ``m`` rows of x take :func:`run_decoded` on the active ISA."""
    return m >= 32 and m >= decoded_min_rows()  # decode steps: no ISA query


def run_decoded(x, packed, scales, qscales, scale2, mean: float, dq_group: int, table, bias, N,
                K, group_size):
    """``x @ W^T (+ bias)`` on checked, contiguous CPU tensors (x float32 (M, K); ``scales``
    float32, or None and the double-quantized ``qscales`` / ``scale2`` / ``mean`` /
    ``dq_group``), ``W`` decoded exactly as the kernels decode it a chunk of rows at a time
    into a reused buffer and multiplied by ``torch.mm`` (:mod:`qkern.ops.decoded`)."""
    args = (ptr(packed), ptr(scales), ptr(qscales), ptr(scale2), float(mean),
            int(dq_group), ptr(table))

    def decode(n0: int, n1: int, w: int) -> None:
        _C.lut4_decode_raw(*args, N, n0, n1, K, group_size, w)

    return chunked_matmul(x, decode, N, K, bias)


def decode_weight(packed, scales, qscales, scale2, mean: float, dq_group: int, table, N, K,
                  group_size) -> torch.Tensor:
    """The float32 weight (N, K), decoded exactly as the CPU kernels decode it, from checked,
    contiguous CPU tensors (``scales`` float32, or None and the double-quantized scales)."""
    w = torch.empty((N, K), dtype=torch.float32)
    _C.lut4_decode_raw(ptr(packed), ptr(scales), ptr(qscales), ptr(scale2), float(mean),
                       int(dq_group), ptr(table), N, 0, N, K, group_size, ptr(w))
    return w


def _gemm_lut4_cpu(x, packed, scales, table, bias, N, K, group_size):
    checks.gemm_lut4("gemm_lut4", x, packed, scales, table, bias, N, K, group_size,
                     cpu_group_error)
    x, packed, scales = contig(x, torch.float32), packed.contiguous(), contig(scales, torch.float32)
    table, bias = contig(table, torch.float32), contig(bias, torch.float32)
    if use_decoded(x.shape[0]):
        return run_decoded(x, packed, scales, None, None, 0.0, 0, table, bias, N, K, group_size)
    return run_gemm_lut4(x, packed, scales, table, bias, N, K, group_size)


def run_gemm_lut4(x, packed, scales, table, bias, N, K, group_size):
    """The CPU body of ``gemm_lut4`` on checked, contiguous arguments (x float32 (M, K))."""
    y = torch.empty((x.shape[0], N), dtype=torch.float32)
    _C.gemm_lut4_raw(ptr(x), x.shape[0], ptr(packed), ptr(scales), ptr(table), ptr(bias), N, K,
                     group_size, ptr(y))
    return y


LIB.impl("gemm_lut4", _gemm_lut4_cpu, "CPU")


def _gemm_lut4_dq_cpu(x, packed, qscales, scale2, mean, table, bias, N, K, group_size,
                      dq_group):
    checks.gemm_lut4_dq(x, packed, qscales, scale2, mean, table, bias, N, K, group_size,
                        dq_group, cpu_group_error)
    x, packed, qscales = contig(x, torch.float32), packed.contiguous(), qscales.contiguous()
    scale2, table = contig(scale2, torch.float32), contig(table, torch.float32)
    mean, bias = float(mean.float().reshape(())), contig(bias, torch.float32)
    if use_decoded(x.shape[0]):
        return run_decoded(x, packed, None, qscales, scale2, mean, dq_group, table, bias, N, K,
                           group_size)
    return run_gemm_lut4_dq(x, packed, qscales, scale2, mean, table, bias, N, K, group_size,
                            dq_group)


def run_gemm_lut4_dq(x, packed, qscales, scale2, mean: float, table, bias, N, K, group_size,
                     dq_group):
    """The CPU body of ``gemm_lut4_dq`` on checked, contiguous arguments (``mean`` a float)."""
    y = torch.empty((x.shape[0], N), dtype=torch.float32)
    _C.gemm_lut4_dq_raw(ptr(x), x.shape[0], ptr(packed), ptr(qscales), ptr(scale2), mean,
                        ptr(table), ptr(bias), N, K, group_size, dq_group, ptr(y))
    return y


LIB.impl("gemm_lut4_dq", _gemm_lut4_dq_cpu, "CPU")


def dq_scales(qscales: torch.Tensor, scale2: torch.Tensor, mean: torch.Tensor,
              dq_group: int) -> torch.Tensor:
    """The block scales ``max(float32(q * scale2[b // dq_group]) + mean, FLT_MIN)`` in torch
    float32 ops (a multiply, then an add: the same bits as the CPU kernel), on any device."""
    q = qscales.reshape(-1)
    s2 = scale2.reshape(-1).float().repeat_interleave(dq_group)[: q.numel()]
    s = q.float() * s2 + mean.reshape(()).float()
    return s.clamp_min(torch.finfo(torch.float32).tiny)


def _gemm_lut4_dq_composite(x, packed, qscales, scale2, mean, table, bias, N, K, group_size,
                            dq_group):
    # devices without a dedicated kernel (CUDA): rebuild the scales, then qkern::gemm_lut4
    scales = dq_scales(qscales, scale2, mean, dq_group).reshape(N, K // group_size)
    return torch.ops.qkern.gemm_lut4(x, packed, scales, table, bias, N, K, group_size)


LIB.impl("gemm_lut4_dq", _gemm_lut4_dq_composite, "CUDA")


def gemm_lut4(x: torch.Tensor, packed: dict[str, torch.Tensor] | torch.Tensor,
              scales: torch.Tensor | None = None, table: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, *, N: int | None = None, K: int | None = None,
              group_size: int | None = None) -> torch.Tensor:
    """Convenience wrapper: ``gemm_lut4(x, pack_weight(...), table=...)`` for x of any leading
    shape (..., K)."""
    if isinstance(packed, dict):
        scales = packed["scales"] if scales is None else scales
        N, K, group_size = packed["N"], packed["K"], packed["group_size"]
        packed = packed["packed"]
    if table is None or scales is None or None in (N, K, group_size):
        raise ValueError("gemm_lut4 needs packed, scales, table, N, K and group_size")
    lead = x.shape[:-1]
    y = torch.ops.qkern.gemm_lut4(x.reshape(-1, K).float().contiguous(), packed, scales,
                                  table[:16].float().contiguous(), bias, N, K, group_size)
    return y.reshape(*lead, N)


def _pack_codes(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) codes 0..15 -> uint8 (N, K // 2), element k in the low nibble for even k."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    err = group_error(codes.shape[1], group_size)
    if err is not None:
        raise ValueError(err)
    c = codes.to(torch.uint8) if codes.dtype != torch.uint8 else codes
    if c.numel() and int(c.max()) > 15:
        raise ValueError("codes must be in 0..15")
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> dict:
    """Packs 4-bit codes (N, K) (uint8, values 0..15) and their float32 scales (N, K/G) for
    ``gemm_lut4``: returns ``{"packed": uint8 (N, K // 2), "scales": float32 (N, K // G),
    "N": N, "K": K, "group_size": G}``."""
    packed = _pack_codes(codes, group_size)
    n, k = codes.shape
    s = scales.detach().float().reshape(n, k // group_size).contiguous()
    return {"packed": packed, "scales": s, "N": n, "K": k, "group_size": group_size}


def pack_weight_dq(codes: torch.Tensor, dq, group_size: int) -> dict:
    """Packs 4-bit codes (N, K) with double-quantized block scales (a ``qkern.tensor.
    DoubleQuant``: ``q.double_quant`` of ``qkern.quantize(w, "nf4", double_quant=True)``, whose
    blocks run along K) for ``gemm_lut4_dq``: returns ``{"packed", "qscales": int8 (N, K // G),
    "scale2": float32, "mean": float32 (1,), "N", "K", "group_size", "dq_group"}``."""
    packed = _pack_codes(codes, group_size)
    n, k = codes.shape
    blocks = n * (k // group_size)
    q = dq.codes.reshape(-1)
    if q.dtype != torch.int8 or q.numel() != blocks:
        raise ValueError(f"double-quantized codes must be int8 with N * K / G = {blocks} values, "
                         f"got {q.dtype} with {q.numel()}")
    s2 = dq.scale2.detach().float().reshape(-1).contiguous()
    if s2.numel() != -(-blocks // dq.group):
        raise ValueError(f"scale2 must have ceil({blocks} / {dq.group}) values, got {s2.numel()}")
    mean = torch.tensor([dq.mean], dtype=torch.float32)  # rounded as double_quantize_scales
    return {"packed": packed, "qscales": q.contiguous(), "scale2": s2, "mean": mean,
            "N": n, "K": k, "group_size": group_size, "dq_group": int(dq.group)}


def gemm_lut4_dq(x: torch.Tensor, packed: dict, table: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ W^T (+ bias)`` for ``packed = pack_weight_dq(...)``."""
    n, k = packed["N"], packed["K"]
    lead = x.shape[:-1]
    y = torch.ops.qkern.gemm_lut4_dq(x.reshape(-1, k).float().contiguous(), packed["packed"],
                                     packed["qscales"], packed["scale2"], packed["mean"],
                                     table[:16].float().contiguous(), bias, n, k,
                                     packed["group_size"], packed["dq_group"])
    return y.reshape(*lead, n)
