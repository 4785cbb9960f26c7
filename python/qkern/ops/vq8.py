"""qkern::gemm_vq8: the VQ matmul's int8 fast mode (csrc/cpu/gemm/vq8/api.h), llama.cpp-IQ2
style: the codebooks in int8 (one float32 scale per codebook), x quantized per row and block of
32 columns to int8 (gemm_w4's fast-mode rule), 4-way integer dot products (AVX-512 VNNI with
VBMI byte look-ups; AVX2 and scalar give the same bits).

``y[i, r] = bs[g] * sum_B float(D[i, r, B]) * (dx[i, B] * s[r, seg(B)]) (+ bias[r])`` with
``D`` the exact integer dot product of block ``B`` (32 columns) of the int8 weight
``books8[g, codes[r, v], d]`` and the int8 activation codes: the weight it multiplies is
``bs[g] * books8[...] * s`` exactly, the activations carry gemm_w4's fast-mode rounding.

Operands: :func:`pack_codes4` (uint8 codes (N, nv) -> (ceil(N / 16), nv / 4, 16, 4); with
``nibbles=True``, for codebooks of <= 16 entries and nv a multiple of 8, two codes a byte:
(ceil(N / 16), nv / 8, 16, 4), byte ``[b, h, l, t] = codes[16 b + l, 8 h + t] | codes[16 b +
l, 8 h + 4 + t] << 4``; the op tells the layouts apart by their shape),
:func:`quantize_codebooks` (float codebooks -> int8 + per-codebook scale). Shapes
(:func:`vq8_fits`): dim 2, 4 or 8, K a multiple of 32, <= 256 entries (128 at dim 8), one
codebook per layer or per a multiple of 16 rows, scale segments of a multiple of 32 columns.

>>> import torch
>>> codes = torch.randint(0, 256, (32, 16), dtype=torch.uint8)
>>> books8, bs = quantize_codebooks(torch.randn(1, 256, 4))
>>> x = torch.randn(1, 64)
>>> y = torch.ops.qkern.gemm_vq8(x, pack_codes4(codes), books8, bs, None, None, 32, 64, 32)
>>> w = decode_vq(codes, books8.float() * bs.view(-1, 1, 1), None, 32)
>>> bool(torch.allclose(y, x @ w.T, rtol=0.05, atol=0.05 * float((x @ w.T).abs().max())))
True
"""

from __future__ import annotations

import torch

from .. import _C
from .cpu import NonFiniteError
from .raw import contig, ptr
from .schemas import LIB
from .vq import ROWS, decode_vq, pack_codes, unpack_codes

__all__ = ["pack_codes4", "quantize_codebooks", "run_gemm_vq8", "unpack_codes4", "vq8_fits",
           "vq8_tables"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pack_codes4(codes: torch.Tensor, nibbles: bool = False) -> torch.Tensor:
    """uint8 codes (N, nv), nv a multiple of 4 -> (ceil(N / 16), nv / 4, 16, 4):
    ``[b, q, l, t] = codes[16 b + l, 4 q + t]`` (rows past N coded 0); ``nibbles``: the 4-bit
    layout (module docstring)."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != torch.uint8:
        raise TypeError("pack_codes4: codes must be a 2-D uint8 tensor (N, nv)")
    n, nv = codes.shape
    if nv % 4:
        raise ValueError(f"pack_codes4: the number of vectors per row ({nv}) must be a "
                         "multiple of 4")
    # gemm_vq's 16-row blocks (nb, nv, 16), each row's 4 consecutive vectors made adjacent
    p = pack_codes(codes)
    p = p.view(p.shape[0], nv // 4, 4, ROWS).transpose(2, 3).contiguous()
    if not nibbles:
        return p
    if nv % 8 or (codes.numel() and int(codes.max()) > 15):
        raise ValueError("pack_codes4: 4-bit codes need codes < 16 and a multiple of 8 vectors")
    return (p[:, 0::2] | (p[:, 1::2] << 4)).contiguous()


def unpack_codes4(packed4: torch.Tensor, r0: int, r1: int, nibbles: bool = False
                  ) -> torch.Tensor:
    """Rows ``r0 .. r1`` of the codes (N, nv) (``r0`` a multiple of 16) of either layout."""
    b0, b1 = r0 // ROWS, -(-r1 // ROWS)
    p = packed4[b0:b1]
    if nibbles:
        p = torch.stack((p & 15, p >> 4), dim=2).flatten(1, 2)
    # back to gemm_vq's blocks (nb, nv, 16)
    p = p.transpose(2, 3).reshape(p.shape[0], -1, ROWS)
    return unpack_codes(p, r0 - b0 * ROWS, r1 - b0 * ROWS)


def quantize_codebooks(codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float codebooks (groups, kc, dim) -> (int8 codebooks in [-127, 127], float32 scales
    (groups,)): symmetric absmax per codebook, round to nearest even (an all-zero codebook
    gets scale 1)."""
    if not isinstance(codebooks, torch.Tensor) or codebooks.dim() != 3 or (
            codebooks.dtype not in _FLOATS):
        raise TypeError("quantize_codebooks: codebooks must be a float (groups, kc, dim) tensor")
    b = codebooks.detach().float()
    if not bool(torch.isfinite(b).all()):
        raise ValueError("quantize_codebooks: codebooks hold NaN or Inf")
    amax = b.abs().amax(dim=(1, 2))
    bs = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(b / bs.view(-1, 1, 1)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), bs.contiguous()


def vq8_tables(books8: torch.Tensor) -> torch.Tensor:
    """The byte planes (groups, dim, 256) int8 the kernel looks codes up in, from int8
    codebooks (groups, kc, dim), kc <= 256: ``[g, d, c] = books8[g, c, d]``, 0 past kc.
    ``run_gemm_vq8`` builds them per call unless given (VQLinear keeps them).

    >>> t = vq8_tables(torch.tensor([[[1, 2], [3, 4]]], dtype=torch.int8))
    >>> t.shape, t[0, :, :3].tolist()
    (torch.Size([1, 2, 256]), [[1, 3, 0], [2, 4, 0]])
    """
    if not isinstance(books8, torch.Tensor) or books8.dim() != 3 or books8.dtype != torch.int8:
        raise TypeError("vq8_tables: books8 must be an int8 (groups, kc, dim) tensor")
    groups, kc, dim = books8.shape
    if not 1 <= kc <= 256 or dim < 1:
        raise ValueError(f"vq8_tables: 1..256 entries of dim >= 1, got {tuple(books8.shape)}")
    books8 = books8.contiguous()
    out = torch.empty((groups, dim, 256), dtype=torch.int8)
    _C.vq8_tables_raw(ptr(books8), groups, kc, dim, ptr(out))
    return out


def vq8_fits(n: int, nv: int, kc: int, dim: int, groups: int, group_rows: int,
             nseg: int | None, nibbles: bool = False) -> bool:
    """Whether gemm_vq8 takes this shape (module docstring; ``nseg`` None: no scales), with
    4-bit codes when ``nibbles``."""
    fits = _C.vq8_nibbles_fit if nibbles else _C.vq8_supported
    return bool(fits(n, nv, groups, kc, dim, group_rows, nseg or 1))


def _nibbles(packed4: torch.Tensor, nv: int) -> bool:
    """Whether ``packed4`` holds the 4-bit layout (nv / 8 code groups of 16 rows)."""
    return nv % 8 == 0 and packed4.dim() == 4 and packed4.shape[1] == nv // 8 and nv > 0


def _check(x, packed4, books8, bs, scales, bias, N, K, group_rows):
    def fail(msg, kind=ValueError):
        raise kind(f"gemm_vq8: {msg}")

    for name, t in (("x", x), ("packed4", packed4), ("codebooks8", books8),
                    ("book_scales", bs), ("scales", scales), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            fail(f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        if t is not None and t.device.type != "cpu":
            fail(f"{name} must be on the CPU, got {t.device}")
    if x.dim() != 2 or x.shape[1] != K or x.dtype not in _FLOATS:
        fail(f"x must be a float (M, K = {K}) tensor, got {x.dtype} {tuple(x.shape)}", TypeError)
    if books8.dim() != 3 or books8.dtype != torch.int8:
        fail("codebooks8 must be an int8 (groups, entries, dim) tensor (quantize_codebooks)",
             TypeError)
    groups, kc, dim = books8.shape
    if not isinstance(group_rows, int) or group_rows < 1:
        fail(f"group_rows must be an int >= 1, got {group_rows!r}")
    if dim < 1 or K % dim or N < 0:
        fail(f"K = {K} is not a whole number of vectors of dim {dim}")
    nv = K // dim
    nib = _nibbles(packed4, nv)
    if packed4.dtype != torch.uint8 or tuple(packed4.shape) != (
            -(-N // ROWS), nv // (8 if nib else 4), ROWS, 4):
        fail(f"packed4 must be uint8 {(-(-N // ROWS), nv // 4, ROWS, 4)} (pack_codes4) or its "
             f"4-bit layout, got {packed4.dtype} {tuple(packed4.shape)}", TypeError)
    if groups != -(-N // group_rows):
        fail(f"{groups} codebooks for {N} rows in groups of {group_rows}")
    if bs.dtype not in _FLOATS or tuple(bs.shape) != (groups,):
        fail(f"book_scales must be float ({groups},), got {bs.dtype} {tuple(bs.shape)}")
    if books8.numel() and int(books8.min()) < -127:
        fail("codebooks8 must lie in [-127, 127] (quantize_codebooks)")
    if scales is not None and (scales.dim() != 2 or scales.shape[0] != N
                               or scales.dtype not in _FLOATS):
        fail(f"scales must be float (N, nseg), got {scales.dtype} {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        fail(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if nib and not vq8_fits(N, nv, kc, dim, groups, group_rows,
                            None if scales is None else scales.shape[1], True):
        fail("4-bit codes need a codebook of <= 16 entries")
    if not vq8_fits(N, nv, kc, dim, groups, group_rows,
                    None if scales is None else scales.shape[1]):
        fail("unsupported shape: dim 2, 4 or 8, K a multiple of 32, <= 256 entries (128 at "
             "dim 8), one codebook or one per a multiple of 16 rows, scale segments of a "
             "multiple of 32 columns")


def _gemm_vq8_cpu(x, packed4, codebooks8, book_scales, scales, bias, N, K, group_rows):
    _check(x, packed4, codebooks8, book_scales, scales, bias, N, K, group_rows)
    x = contig(x, torch.float32)
    bs, scales, bias = (contig(t, torch.float32) for t in (book_scales, scales, bias))
    return run_gemm_vq8(x, packed4.contiguous(), codebooks8.contiguous(), bs, scales, bias, N,
                        K, group_rows)


def run_gemm_vq8(x, packed4, books8, bs, scales, bias, N: int, K: int,
                 group_rows: int, tables: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU body of ``gemm_vq8`` on checked, contiguous operands of the kernel's dtypes
    (x float32 (M, K)): the op after its checks, and VQLinear's eager decode path (its
    operands were checked when it built them; the kernel still checks every code).
    ``tables``: :func:`vq8_tables` of ``books8`` (built here when None; the same bits)."""
    groups, kc, dim = books8.shape
    y = torch.empty((x.shape[0], N), dtype=torch.float32)
    bad = _C.gemm_vq8_raw(ptr(x), x.shape[0], ptr(packed4), N, K // dim, ptr(books8), ptr(bs),
                          groups, kc, dim, group_rows, ptr(scales),
                          0 if scales is None else scales.shape[1], ptr(bias), ptr(y),
                          _nibbles(packed4, K // dim), ptr(tables))
    if bad:
        raise NonFiniteError("gemm_vq8: x contains NaN or Inf (the fast mode quantizes x to "
                             "int8; use gemm_vq to propagate them)")
    return y


LIB.impl("gemm_vq8", _gemm_vq8_cpu, "CPU")


def decode_vq8(args: dict, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0 .. r1`` of the float32 weight gemm_vq8 multiplies (its autograd's decode)."""
    books = args["codebooks8"].float() * args["book_scales"].float().view(-1, 1, 1)
    nib = _nibbles(args["packed4"], args["K"] // books.shape[2])
    return decode_vq(unpack_codes4(args["packed4"], r0, r1, nib), books, args["scales"],
                     args["group_rows"], r0)
