"""QTensor: integer codes + scale (+ zero point) + layout, its packed form, and
``dequantize`` (the codes back to floats through the qkern:: ops)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import formats as F
from .layout import Layout
from .packing import pack_bits, unpack_bits

_OPS = torch.ops.qkern


@dataclass
class DoubleQuant:
    """Second-level quantization of block scales: scale = codes * scale2[g // 256] + mean."""

    codes: torch.Tensor  # int8, one per block
    scale2: torch.Tensor  # float32, one per 256 blocks
    mean: float
    group: int = 256

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale2.numel() + 4


@dataclass
class QTensor:
    """A quantized tensor. ``codes`` are unpacked (one integer per element, int8 for signed
    integer formats, uint8 otherwise); ``dequantize()`` gives floats back. ``zero_point`` is
    int32, or float32 for integer formats with float zero points (HQQ): the value is then
    ``(float(q) - z) * s``, each operation rounded to float32."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    format: F.Format
    layout: Layout
    dtype: torch.dtype = torch.float32
    quantizer: str = "midtread"
    double_quant: DoubleQuant | None = field(default=None, repr=False)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.layout.shape)

    @property
    def granularity(self) -> str:
        return self.layout.granularity

    @property
    def axis(self) -> int | None:
        return self.layout.axis

    @property
    def group_size(self) -> int | None:
        return self.layout.group_size if self.layout.granularity == "group" else None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype=dtype)

    def pack(self) -> PackedQTensor:
        flat = self.codes.reshape(-1).view(torch.uint8)
        return PackedQTensor(pack_bits(flat, self.format.bits), replace(self, codes=None))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed representation: codes at ``bits`` each, scales as stored
        (float32, E8M0 for MX, int8 + second level with double quantization), zero points at
        ``bits`` each."""
        fmt = self.format
        n = (self.layout.numel * fmt.bits + 7) // 8
        if self.double_quant is not None:
            n += self.double_quant.nbytes
        else:
            n += (self.scale.numel() * fmt.scale_bits + 7) // 8
        if self.zero_point is not None:  # integer zero points at `bits`, float ones at 32
            zbits = 32 if self.zero_point.is_floating_point() else fmt.bits
            n += (self.zero_point.numel() * zbits + 7) // 8
        return n

    @property
    def bits_per_element(self) -> float:
        numel = self.layout.numel
        return 8.0 * self.nbytes / numel if numel else 0.0

    def __repr__(self) -> str:
        return (
            f"QTensor(format={self.format.name}, shape={tuple(self.shape)}, "
            f"granularity={self.granularity}, bits_per_element={self.bits_per_element:.3f})"
        )


@dataclass
class PackedQTensor:
    """Densely bit-packed codes (LSB-first stream) plus everything needed to unpack them."""

    data: torch.Tensor  # uint8
    meta: QTensor  # codes=None

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes

    def unpack(self) -> QTensor:
        fmt, layout = self.meta.format, self.meta.layout
        codes = unpack_bits(self.data, fmt.bits, layout.numel)
        if fmt.kind == "int" and fmt.signed:  # sign-extend the low `bits` bits
            shift = 8 - fmt.bits
            codes = (codes.view(torch.int8) << shift) >> shift
        return replace(self.meta, codes=codes.view(layout.shape))


def dequantize(qt: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float values of a QTensor (in the dtype it was quantized from unless ``dtype``)."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(qt).__name__}")
    fmt, layout = qt.format, qt.layout
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dequantize: dtype must be a floating-point torch.dtype, got {dtype!r} "
                        "(use .codes for the integer codes)")
    dtype = dtype or qt.dtype
    if layout.numel == 0:
        return torch.empty(layout.shape, dtype=dtype)
    g = layout.group_size
    codes = layout.to_kernel(qt.codes.view(torch.uint8))
    sck = layout.scale_to_kernel(qt.scale.float())
    if fmt.kind == "int" and qt.zero_point is not None and qt.zero_point.is_floating_point():
        out = dequantize_float_zero(codes, sck, layout.scale_to_kernel(qt.zero_point.float()),
                                    g, fmt.signed, qt.quantizer)
    elif fmt.kind == "int":
        zpk = None if qt.zero_point is None else layout.scale_to_kernel(qt.zero_point)
        offset = 0.5 if qt.quantizer == "midrise" else 0.0
        out = _OPS.dequantize_affine(codes, sck, zpk, g, fmt.signed, offset)
    else:
        out = _OPS.dequantize_lut(codes, sck, torch.from_numpy(fmt.lut).to(codes.device), g)
    return layout.from_kernel(out).to(dtype)


def dequantize_float_zero(codes: torch.Tensor, sck: torch.Tensor, zk: torch.Tensor, g: int,
                          signed: bool, quantizer: str = "midtread") -> torch.Tensor:
    """Kernel-order codes (uint8 view) with float32 scales and float32 zero points per group of
    ``g``: ``(float(q) - z) * s`` (plus 0.5 for midrise), each operation rounded to float32, as
    the w4 / w23 kernels decode float zero points."""
    q = (codes.view(torch.int8) if signed else codes).float().view(-1, g)
    if quantizer == "midrise":
        q = q + 0.5
    return ((q - zk.view(-1, 1)) * sck.view(-1, 1)).view(-1)
