"""qkern::gemm_vq: fused matmul over vector-quantized weights (:class:`qkern.vq.linear.VQLinear`,
GPTVQ's layout), without decoding the weight (csrc/cpu/gemm/vq/api.h).

``y = x @ W^T (+ bias)`` with ``W[r, v*dim:(v+1)*dim] = s[r, v // spv] * codebooks[r //
group_rows, codes[r, v]]``: codes (N, nv) uint8 or uint16, codebooks (groups, kc, dim) float32
(groups = ceil(N / group_rows)), scales None or (N, nseg) float32 (``spv = nv / nseg`` vectors
per segment), K = nv * dim. The op takes the codes packed in blocks of 16 rows
(:func:`pack_codes`: ``packed[b, v, l] = codes[16 b + l, v]``, (ceil(N / 16), nv, 16)), or, for
codebooks of <= 16 entries shared by whole blocks (one per layer or per a multiple of 16 rows;
one scale segment or segments of a multiple of 8 vectors), 4 bits each
(``pack_codes(codes, nibbles=True)``: int32 words (ceil(N / 16), ceil(nv / 8), 16), word
``[b, w, l]`` holding the codes of row ``16 b + l``, vectors ``8 w .. 8 w + 7`` in bits 0-3,
4-7, ...): half the bytes, the same result bits.

Numerics (float32, the same bits on every ISA and thread count): for a block of 16 rows that
share a codebook the kernel computes each ``x_v . c`` once per codebook entry and adds
``t[v][code]`` per row; a segment's sum is multiplied by its scale, so results agree with
``x @ decode(...)^T`` to float32 rounding, not bit for bit. A code >= kc raises ValueError.

>>> import torch
>>> codes = torch.tensor([[0, 1], [1, 1]], dtype=torch.uint8)
>>> books = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
>>> x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
>>> torch.ops.qkern.gemm_vq(x, pack_codes(codes), books, None, None, 2, 4, 2).tolist()
[[5.0, 7.0]]
"""

from __future__ import annotations

import math

import torch

from .. import _C
from .decoded import chunked_matmul
from .raw import contig, ptr
from .schemas import LIB

# ``torch.ops.qkern.dequantize_vq(packed, codebooks, scales, N, K, group_rows)``: the decoded
# float32 weight (N, K) of the same operands (C++, threaded): what VQLinear multiplies with a
# GEMM when x has many rows. Frozen weights only (no autograd: :func:`decode_vq` is the
# differentiable twin).

__all__ = ["ROWS", "check_gemm_vq", "decode_vq", "linear_decoded", "nibbles_fit",
           "pack_codes", "unpack_codes"]

ROWS = 16  # rows per block of the packed layout
_CODES = {torch.uint8: 256, torch.uint16: 65536}
_PACKED = {torch.uint8: 256, torch.uint16: 65536, torch.int32: 16}  # int32: 4-bit words
_LAYOUT = {torch.uint8: 0, torch.uint16: 1, torch.int32: 2}  # the kernels' layout numbers
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pack_codes(codes: torch.Tensor, nibbles: bool = False) -> torch.Tensor:
    """codes (N, nv) uint8 / uint16 -> (ceil(N / 16), nv, 16), rows past N coded 0; with
    ``nibbles`` (codes < 16) the int32 words (ceil(N / 16), ceil(nv / 8), 16) (module
    docstring)."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype not in _CODES:
        raise TypeError("pack_codes: codes must be a 2-D uint8 or uint16 tensor (N, nv)")
    n, nv = codes.shape
    nb = -(-n // ROWS)
    full = torch.cat((codes, codes.new_zeros((nb * ROWS - n, nv))))
    packed = full.view(nb, ROWS, nv).transpose(1, 2)
    if not nibbles:
        return packed.contiguous()
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_codes: 4-bit packing needs codes < 16")
    nw = -(-nv // 8)
    p = torch.cat((packed.to(torch.int64), packed.new_zeros((nb, nw * 8 - nv, ROWS),
                                                            dtype=torch.int64)), dim=1)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64).view(1, 1, 8, 1)
    words = (p.view(nb, nw, 8, ROWS) << shifts).sum(2)  # < 2^32: the bits never overlap
    return (words - (words >= 2 ** 31) * 2 ** 32).to(torch.int32)


def unpack_codes(packed: torch.Tensor, r0: int, r1: int, nv: int | None = None) -> torch.Tensor:
    """Rows ``r0 .. r1`` of the codes (N, nv) from either packed layout (``r0`` a multiple of
    16; ``nv`` needed for 4-bit words)."""
    b0, b1 = r0 // ROWS, -(-r1 // ROWS)
    p = packed[b0:b1]
    if packed.dtype == torch.int32:
        shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=p.device).view(1, 1, 8, 1)
        p = ((p.to(torch.int64).unsqueeze(2) >> shifts) & 15).to(torch.uint8)
        p = p.reshape(p.shape[0], -1, ROWS)[:, :nv]
    return p.transpose(1, 2).reshape(-1, p.shape[1])[:r1 - r0]


def decode_vq(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor | None,
              group_rows: int, row0: int = 0) -> torch.Tensor:
    """The float32 weight rows ``row0 .. row0 + len(codes)`` (rows, nv * dim): each vector its
    codebook entry, times its segment's scale (one float32 product); torch ops, any device,
    differentiable in ``codebooks`` and ``scales``."""
    rows, nv = codes.shape
    groups, kc, dim = codebooks.shape
    g = torch.arange(row0, row0 + rows, device=codes.device) // group_rows
    # one index_select of codebook rows (its backward, an index_add, is much faster on the CPU
    # than a 2-D gather's)
    index = (g[:, None] * kc + codes.to(torch.int64)).reshape(-1)
    w = codebooks.float().reshape(-1, dim).index_select(0, index).reshape(rows, -1)
    if scales is None:
        return w
    s = scales[row0:row0 + rows].float()
    return (w.view(rows, s.shape[1], -1) * s.unsqueeze(-1)).view(rows, -1)


def check_gemm_vq(x, packed, codebooks, scales, bias, N: int, K: int, group_rows: int,
                  op: str = "gemm_vq") -> None:
    """Clear errors for arguments the kernel cannot take (module docstring); ``x`` None for
    ``dequantize_vq``."""
    def fail(msg, kind=ValueError):
        raise kind(f"{op}: {msg}")

    for name, t in (("x", x), ("packed", packed), ("codebooks", codebooks), ("scales", scales),
                    ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            fail(f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        if t is not None and t.device.type != "cpu":
            fail(f"{name} must be on the CPU, got {t.device}")
    if x is not None and (x.dim() != 2 or x.shape[1] != K or x.dtype not in _FLOATS):
        fail(f"x must be a float (M, K = {K}) tensor, got {x.dtype} {tuple(x.shape)}", TypeError)
    if codebooks.dim() != 3 or codebooks.dtype not in _FLOATS:
        fail("codebooks must be a float (groups, entries, dim) tensor", TypeError)
    groups, kc, dim = codebooks.shape
    if packed.dtype not in _PACKED or packed.dim() != 3 or packed.shape[2] != ROWS:
        fail(f"packed must be uint8 / uint16 codes (ceil(N / 16), nv, 16) or int32 4-bit words "
             f"(pack_codes), got {packed.dtype} {tuple(packed.shape)}", TypeError)
    if not isinstance(group_rows, int) or group_rows < 1:
        fail(f"group_rows must be an int >= 1, got {group_rows!r}")
    nv = K // dim if dim >= 1 else -1
    words = packed.dtype == torch.int32
    if N < 0 or packed.shape[0] != -(-N // ROWS) or nv * dim != K or packed.shape[1] != (
            -(-nv // 8) if words else nv):
        fail(f"packed {tuple(packed.shape)} and codebooks of dim {dim} do not hold an "
             f"(N = {N}, K = {K}) weight")
    if kc < 1 or kc > _PACKED[packed.dtype] or dim < 1:
        fail(f"{kc} codebook entries of dim {dim} with {packed.dtype} codes")
    if groups != -(-N // group_rows):
        fail(f"{groups} codebooks for {N} rows in groups of {group_rows}; expected "
             f"{-(-N // group_rows)}")
    if scales is not None and (scales.dim() != 2 or scales.shape[0] != N or scales.shape[1] < 1
                               or nv % scales.shape[1] or scales.dtype not in _FLOATS):
        fail(f"scales must be float (N, nseg) with nseg dividing the {nv} vectors per row, got "
             f"{scales.dtype} {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        fail(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if words and not nibbles_fit(N, nv, kc, groups, group_rows, scales):
        fail("4-bit words need <= 16 codebook entries, one codebook per layer or per a "
             "multiple of 16 rows, and one scale segment or segments of a multiple of 8 vectors")


def nibbles_fit(n: int, nv: int, kc: int, groups: int, group_rows: int, scales) -> bool:
    """Whether the 4-bit word layout serves this shape (module docstring)."""
    seg_ok = scales is None or scales.shape[1] == 1 or (nv // scales.shape[1]) % 8 == 0
    return kc <= 16 and (groups == 1 or group_rows % ROWS == 0) and seg_ok


def _gemm_vq_cpu(x, packed, codebooks, scales, bias, N, K, group_rows):
    check_gemm_vq(x, packed, codebooks, scales, bias, N, K, group_rows)
    x, books = contig(x, torch.float32), contig(codebooks, torch.float32)
    scales, bias = contig(scales, torch.float32), contig(bias, torch.float32)
    packed = packed.contiguous()
    groups, kc, dim = codebooks.shape
    y = torch.empty((x.shape[0], N), dtype=torch.float32)
    _C.gemm_vq_raw(ptr(x), x.shape[0], ptr(packed), _LAYOUT[packed.dtype], N, K // dim,
                   ptr(books), groups, kc, dim, group_rows, ptr(scales),
                   0 if scales is None else scales.shape[1], ptr(bias), ptr(y))
    return y


LIB.impl("gemm_vq", _gemm_vq_cpu, "CPU")


def _dequantize_vq_cpu(packed, codebooks, scales, N, K, group_rows):
    check_gemm_vq(None, packed, codebooks, scales, None, N, K, group_rows, "dequantize_vq")
    books, scales = contig(codebooks, torch.float32), contig(scales, torch.float32)
    packed = packed.contiguous()
    groups, kc, dim = codebooks.shape
    w = torch.empty((N, K), dtype=torch.float32)
    _C.decode_vq_raw(ptr(packed), _LAYOUT[packed.dtype], N, K // dim, ptr(books), groups, kc,
                     dim, group_rows, ptr(scales), 0 if scales is None else scales.shape[1],
                     ptr(w))
    return w


LIB.impl("dequantize_vq", _dequantize_vq_cpu, "CPU")



def linear_decoded(x, packed, books, scales, bias, N, K, group_rows) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a float32 contiguous ``x`` (M, K) and the gemm_vq operands
    (contiguous, float32, checked by the caller: :class:`qkern.vq.linear.VQLinear`'s kernel
    operands), ``W`` decoded by chunks of rows into a reused buffer
    (:func:`qkern.ops.decoded.chunked_matmul`). No autograd (frozen weights)."""
    groups, kc, dim = books.shape
    nseg = 0 if scales is None else scales.shape[1]
    layout = _LAYOUT[packed.dtype]

    def decode(n0: int, n1: int, w: int) -> None:
        g0 = 0 if groups == 1 else n0 // group_rows
        _C.decode_vq_raw(ptr(packed[n0 // ROWS:]), layout, n1 - n0, K // dim, ptr(books[g0:]),
                         -(-(n1 - n0) // group_rows), kc, dim, group_rows,
                         ptr(None if scales is None else scales[n0:]), nseg, w)

    step = ROWS if groups == 1 else math.lcm(ROWS, group_rows)
    return chunked_matmul(x, decode, N, K, bias, step)
