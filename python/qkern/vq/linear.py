"""A Linear layer whose weight is stored as vector-quantization codes (GPTVQ's format):
each row of the weight (out, in) is cut into ``in / dim`` vectors of ``dim`` consecutive
input elements, each stored as the index of an entry of its row group's codebook, optionally
times a per-row scale for each segment of ``scale_group`` input columns.

``VQLinear(codes, codebooks, scales, bias, group_rows, lattice=None)``:

- ``codes`` (out, in / dim), uint8 (codebooks of <= 256 entries) or uint16;
- ``codebooks`` (groups, k, dim), float16 or float32: group ``g`` serves the output rows
  ``g * group_rows .. (g + 1) * group_rows - 1`` (the last group may be shorter);
- ``scales`` None or (out, in / scale_group) float16;
- ``lattice`` None (a learned codebook) or "D4" / "E8": the one codebook is then the centred
  Voronoi code of that lattice (:func:`qkern.vq.lattice.lattice_codebook` with
  ``centered=True``, ``2^(bits * dim)`` entries; checked on construction), implicit, so it is
  not counted in ``bits_per_weight``; scales are required.

``W[r, v * dim:(v + 1) * dim] = scales[r, v * dim // scale_group] * codebooks[r // group_rows,
codes[r, v]]`` (in float32), and ``forward(x) = x @ W^T + bias``. On the CPU, for up to
``FUSED_MAX_ROWS`` rows of ``x`` (decoding), ``forward`` runs the fused kernel
``qkern::gemm_vq`` (:mod:`qkern.ops.vq`: per block of 16 rows the dot products of ``x`` with
the codebook entries, then one look-up per code; the weight is never decoded); for more rows
it decodes the weight in C++ (``qkern::dequantize_vq``) a chunk of about 8 MiB at a time into
a reused buffer and multiplies each chunk with ``torch.mm`` (a GEMM;
:func:`qkern.ops.vq.linear_decoded`; ``F.linear`` on the whole decoded weight under
``torch.compile``, for other dtypes and when ``x`` requires grad); when the codebooks or
scales require grad (codebook fine-tuning) or off the CPU, it decodes with torch ops
(:meth:`dequantize_weight`, differentiable). They agree to float32 rounding.

``mode="fast"`` (llama.cpp IQ2-style, about int2's decode speed): the codebooks are rounded to
int8 (one float32 scale per codebook, :func:`qkern.ops.vq8.quantize_codebooks`) and ``x`` to
int8 per row and block of 32 columns inside the kernel ``qkern::gemm_vq8`` (integer dot
products), for any number of rows (it decodes each block of 16 weight rows once per call;
AMX tiles from 16 rows where the CPU has them), so decode and prefill give the same bits
per row. Shapes it does not take (:func:`qkern.ops.vq8.vq8_fits`: dim 2 / 4 / 8, in a multiple of
32, <= 256 entries, 128 at dim 8, one codebook or one per a multiple of 16 rows, scale groups
of a multiple of 32) run the exact path: ``fast_active`` says which. NaN / Inf in ``x`` raise
``qkern.ops.NonFiniteError`` in the fast kernel.

``bits_per_weight`` = (code bits + codebook bits + scale bits) / (out * in), the codes counted
at ``log2(k)`` bits each (bit-packed: ``bits * dim`` per vector), codebook entries and scales
at their storage width (16 or 32 bits per number); a lattice codebook counts 0 bits.

>>> import torch
>>> codes = torch.tensor([[0, 1], [1, 1]], dtype=torch.uint8)
>>> cb = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float16)
>>> layer = VQLinear(codes, cb, None, None, group_rows=2)
>>> layer.dequantize_weight().tolist()
[[1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 3.0, 4.0]]
>>> layer.bits_per_weight  # (4 codes x 1 bit + 2 x 2 x 16 codebook bits) / 8 weights
8.5
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.vq import decode_vq, linear_decoded, nibbles_fit, pack_codes
from ..ops.vq8 import (
    pack_codes4,
    quantize_codebooks,
    run_gemm_vq8,
    vq8_fits,
    vq8_tables,
)
from .lattice import lattice_codebook

__all__ = ["FUSED_MAX_ROWS", "MODES", "VQLinear"]

#: the most rows of x (tokens) the float fused kernel takes (its cost grows with the rows;
#: past about 32 decoding the weight once for a GEMM is cheaper); the fast mode's int8 kernel
#: takes every row count
FUSED_MAX_ROWS = 32

_FLOATS = (torch.float16, torch.float32)
#: VQLinear's modes (module docstring)
MODES = ("exact", "fast")
_LATTICE_DIMS = {"D4": 4, "E8": 8}


class VQLinear(nn.Module):
    """A Linear layer over a vector-quantized weight (module docstring)."""

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor,
                 scales: torch.Tensor | None, bias: torch.Tensor | None, group_rows: int,
                 lattice: str | None = None, mode: str = "exact"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"VQLinear: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype not in (
                torch.uint8, torch.uint16):
            raise TypeError("VQLinear: codes must be a 2-D uint8 or uint16 tensor (out, in/dim)")
        if not isinstance(codebooks, torch.Tensor) or codebooks.dim() != 3 or (
                codebooks.dtype not in _FLOATS):
            raise TypeError("VQLinear: codebooks must be a 3-D float16 / float32 tensor "
                            "(groups, k, dim)")
        if not isinstance(group_rows, int) or group_rows < 1:
            raise ValueError(f"VQLinear: group_rows must be an int >= 1, got {group_rows!r}")
        out, nv = codes.shape
        groups, k, dim = codebooks.shape
        if groups != math.ceil(out / group_rows):
            raise ValueError(f"VQLinear: {groups} codebooks for {out} rows in groups of "
                             f"{group_rows}; expected {math.ceil(out / group_rows)}")
        if codes.numel() and int(codes.to(torch.int64).max()) >= k:
            raise ValueError(f"VQLinear: a code is >= the codebook size {k}")
        self.in_features, self.out_features = nv * dim, out
        if scales is not None:
            if scales.dim() != 2 or scales.shape[0] != out or scales.dtype not in _FLOATS or (
                    self.in_features % scales.shape[1]) or (
                    (self.in_features // scales.shape[1]) % dim):
                raise ValueError("VQLinear: scales must be float16 / float32 (out, in / "
                                 "scale_group), scale_group a multiple of dim dividing in")
        if bias is not None and tuple(bias.shape) != (out,):
            raise ValueError(f"VQLinear: bias must have shape ({out},), got {tuple(bias.shape)}")
        if lattice is not None:
            _check_lattice(lattice, codebooks, scales)
        self.group_rows, self.dim, self.k, self.lattice = group_rows, dim, k, lattice
        self.mode = mode
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("codebooks", codebooks.contiguous())
        self.register_buffer("scales", None if scales is None else scales.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        for name in ("_vq_packed", "_vq_books", "_vq_scales", "_vq_bias", "_vq8_books",
                     "_vq8_bs", "_vq8_tables"):
            self.register_buffer(name, None, persistent=False)
        self.refresh_kernel_operands()

    def dequantize_weight(self) -> torch.Tensor:
        """The decoded weight (out, in) float32 (differentiable in the codebooks and scales)."""
        return decode_vq(self.codes, self.codebooks, self.scales, self.group_rows)

    def _buffers_key(self) -> tuple:
        bufs = (self.codes, self.codebooks, self.scales, self.bias)
        return (self.mode, *(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)
                             for t in bufs))

    @property
    def fast_active(self) -> bool:
        """Whether ``forward`` runs the int8 fast kernel (``mode="fast"`` on a shape it
        takes)."""
        return self._vq8_books is not None

    def refresh_kernel_operands(self) -> None:
        """Rebuilds the fused kernel's operands (codes packed in blocks of 16 rows, float32
        or, in fast mode, int8 codebooks and their byte planes, scales and bias:
        non-persistent buffers) from
        ``codes`` / ``codebooks`` / ``scales`` / ``bias``. ``forward`` calls it itself when one
        of them was replaced or changed in place (eagerly; a compiled forward uses the
        operands as they are)."""
        groups, nv = self.codebooks.shape[0], self.codes.shape[1]
        nseg = None if self.scales is None else self.scales.shape[1]
        fast = self.mode == "fast" and self.codes.dtype == torch.uint8 and vq8_fits(
            self.out_features, nv, self.k, self.dim, groups, self.group_rows, nseg)
        self._vq8_books = self._vq8_bs = self._vq8_tables = None
        if fast:
            self._vq_nib = vq8_fits(self.out_features, nv, self.k, self.dim, groups,
                                    self.group_rows, nseg, nibbles=True)
            self._vq_packed = pack_codes4(self.codes, nibbles=self._vq_nib)
            self._vq8_books, self._vq8_bs = quantize_codebooks(self.codebooks)
            self._vq8_tables = vq8_tables(self._vq8_books)
        else:
            nib = self.codes.dtype == torch.uint8 and nibbles_fit(
                self.out_features, nv, self.k, groups, self.group_rows, self.scales)
            self._vq_packed = pack_codes(self.codes, nibbles=nib)
        for name, t in (("_vq_books", None if fast else self.codebooks),
                        ("_vq_scales", self.scales), ("_vq_bias", self.bias)):
            setattr(self, name, None if t is None else t.detach().float().contiguous())
        self._vq_key = self._buffers_key()

    def _forward_fast(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        # every row count: the kernel decodes each 16-row block once per call (on AMX tiles
        # from 16 rows), 2-5x faster than decoding the weight for a GEMM at prefill
        x2 = x.reshape(rows, self.in_features)
        if (not torch.compiler.is_compiling() and x.dtype == torch.float32 and
                x2.is_contiguous() and not torch.is_grad_enabled()):
            # eager: the op's per-call checks cost about as much as a small layer's matmul;
            # the operands were checked when refresh_kernel_operands built them
            return run_gemm_vq8(x2, self._vq_packed, self._vq8_books, self._vq8_bs,
                                self._vq_scales, self._vq_bias, self.out_features,
                                self.in_features, self.group_rows, self._vq8_tables)
        return torch.ops.qkern.gemm_vq8(x2, self._vq_packed, self._vq8_books, self._vq8_bs,
                                        self._vq_scales, self._vq_bias, self.out_features,
                                        self.in_features, self.group_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.numel() // max(1, self.in_features)
        trained = self.codebooks.requires_grad or (
            self.scales is not None and self.scales.requires_grad)
        if x.device.type == "cpu" and self.codes.device.type == "cpu" and not trained:
            if not torch.compiler.is_compiling() and self._vq_key != self._buffers_key():
                self.refresh_kernel_operands()
            if self._vq8_books is not None:
                y = self._forward_fast(x, rows)
                return y.reshape(*lead, self.out_features).to(x.dtype)
            if rows <= FUSED_MAX_ROWS:
                y = torch.ops.qkern.gemm_vq(x.reshape(rows, self.in_features), self._vq_packed,
                                            self._vq_books, self._vq_scales, self._vq_bias,
                                            self.out_features, self.in_features,
                                            self.group_rows)
                return y.reshape(*lead, self.out_features).to(x.dtype)
            x2 = x.reshape(rows, self.in_features)
            if (not torch.compiler.is_compiling() and x.dtype == torch.float32 and
                    x2.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad)):
                # by chunks into a reused buffer (no page faults per call; the operands were
                # checked when refresh_kernel_operands built them)
                y = linear_decoded(x2, self._vq_packed, self._vq_books, self._vq_scales,
                                   self._vq_bias, self.out_features, self.in_features,
                                   self.group_rows)
                return y.reshape(*lead, self.out_features)
            w = torch.ops.qkern.dequantize_vq(self._vq_packed, self._vq_books, self._vq_scales,
                                              self.out_features, self.in_features,
                                              self.group_rows).to(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        w = self.dequantize_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @property
    def code_bits(self) -> int:
        """Bits of the codes, bit-packed: ``log2(k)`` (rounded up) per vector."""
        return self.codes.numel() * max(1, math.ceil(math.log2(self.k)))

    @property
    def overhead_bits(self) -> int:
        """Bits of the codebooks and scales at their storage width (a lattice codebook:
        none, it is implicit)."""
        n = 0 if self.lattice else self.codebooks.numel() * self.codebooks.element_size() * 8
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size() * 8
        return n

    @property
    def bits_per_weight(self) -> float:
        """(codes + codebooks + scales) bits / (out * in)."""
        return (self.code_bits + self.overhead_bits) / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        s = "" if self.scales is None else (
            f", scale_group={self.in_features // self.scales.shape[1]}")
        if self.lattice:
            s += f", lattice={self.lattice}"
        if self.mode != "exact":
            s += f", mode={self.mode}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dim={self.dim}, k={self.k}, group_rows={self.group_rows}{s}, "
                f"bits_per_weight={self.bits_per_weight:.4f}")


def _check_lattice(lattice, codebooks: torch.Tensor, scales) -> None:
    """A lattice layer's codebook must be the centred Voronoi code it claims to be."""
    if lattice not in _LATTICE_DIMS:
        raise ValueError(f"VQLinear: lattice must be None or one of {sorted(_LATTICE_DIMS)}, "
                         f"got {lattice!r}")
    groups, k, dim = codebooks.shape
    ld = _LATTICE_DIMS[lattice]
    nb = k.bit_length() - 1
    if dim != ld or groups != 1 or k != 1 << nb or nb % ld:
        raise ValueError(f"VQLinear: a {lattice} codebook is (1, 2^(bits * {ld}), {ld}), got "
                         f"{tuple(codebooks.shape)}")
    if scales is None:
        raise ValueError(f"VQLinear: a {lattice} lattice codebook needs scales")
    ref = lattice_codebook(lattice, nb // ld, centered=True)
    if not np.array_equal(codebooks[0].detach().cpu().double().numpy(), ref):
        raise ValueError(f"VQLinear: codebooks are not the centred {lattice} Voronoi code of "
                         f"{nb // ld} bits per dimension (qkern.vq.lattice.lattice_codebook)")
