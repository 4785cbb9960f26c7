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

    def dequantize(self, dtype: torch.dtype | None = None, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize(self, dtype=dtype, out=out)

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


def dequantize(qt: QTensor, dtype: torch.dtype | None = None, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Float values of a QTensor (in the dtype it was quantized from unless ``dtype``).
    ``out``: a contiguous tensor of the QTensor's shape on its device, written in place and
    returned; its dtype is the result's (``dtype`` defaults to it). float32 outputs in the
    kernels' order (per tensor, per channel along axis 0, groups along the last axis) are
    written by the kernels directly; others receive a copy."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(qt).__name__}")
    fmt, layout = qt.format, qt.layout
    if dtype is None and out is not None and isinstance(out, torch.Tensor):
        dtype = out.dtype
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dequantize: dtype must be a floating-point torch.dtype, got {dtype!r} "
                        "(use .codes for the integer codes)")
    dtype = dtype or qt.dtype
    if out is not None:
        check_dequantize_out(out, layout.shape, dtype, qt.codes.device)
    if layout.numel == 0:
        return torch.empty(layout.shape, dtype=dtype) if out is None else out
    g = layout.group_size
    codes = layout.to_kernel(qt.codes.view(torch.uint8))
    sck = layout.scale_to_kernel(qt.scale.float())
    direct = (out is not None and dtype == torch.float32 and layout.in_kernel_order
              and out.device.type == "cpu")
    dst = (out.view(-1),) if direct else ()
    if fmt.kind == "int" and qt.zero_point is not None and qt.zero_point.is_floating_point():
        res = dequantize_float_zero(codes, sck, layout.scale_to_kernel(qt.zero_point.float()),
                                    g, fmt.signed, qt.quantizer)
        direct = False
    elif fmt.kind == "int":
        zpk = None if qt.zero_point is None else layout.scale_to_kernel(qt.zero_point)
        offset = 0.5 if qt.quantizer == "midrise" else 0.0
        op = _OPS.dequantize_affine_out if direct else _OPS.dequantize_affine
        res = op(codes, sck, zpk, g, fmt.signed, offset, *dst)
    else:
        lut = torch.from_numpy(fmt.lut).to(codes.device)
        op = _OPS.dequantize_lut_out if direct else _OPS.dequantize_lut
        res = op(codes, sck, lut, g, *dst)
    if direct:
        return out
    res = layout.from_kernel(res).to(dtype)
    if out is None:
        return res
    out.copy_(res)
    return out


def dequantize_float_zero(codes: torch.Tensor, sck: torch.Tensor, zk: torch.Tensor, g: int,
                          signed: bool, quantizer: str = "midtread") -> torch.Tensor:
    """Kernel-order codes (uint8 view) with float32 scales and float32 zero points per group of
    ``g``: ``(float(q) - z) * s`` (plus 0.5 for midrise), each operation rounded to float32, as
    the w4 / w23 kernels decode float zero points."""
    q = (codes.view(torch.int8) if signed else codes).float().view(-1, g)
    if quantizer == "midrise":
        q = q + 0.5
    return ((q - zk.view(-1, 1)) * sck.view(-1, 1)).view(-1)


# ---- out=: the preallocated outputs of quantize / dequantize --------------------------------
# Checked (clear errors before any kernel runs) and, where the layout allows, handed to the
# ``*_out`` ops as flat views so the kernels write them in place; otherwise the result is
# copied in.

def _check(ok: bool, msg) -> None:
    """``msg``: the message, or a function making it (formatted only on failure: a call that
    passes pays no reprs)."""
    if not ok:
        raise ValueError(f"out= {msg() if callable(msg) else msg}")


def _tensor(t, name: str, shape, dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"out= {name} must be a tensor, got {type(t).__name__}")
    _check(tuple(t.shape) == tuple(shape),
           lambda: f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise TypeError(f"out= {name} has dtype {t.dtype}, expected {dtype}")
    _check(t.device == device, lambda: f"{name} is on {t.device}, the input on {device}")
    _check(t.is_contiguous(), f"{name} must be contiguous")


def check_quantize_out(out, fmt: F.Format, layout, symmetric: bool, device, code_dtype) -> None:
    """``out`` (a QTensor, e.g. an earlier result) can hold ``quantize(x, fmt, ...)``."""
    if not isinstance(out, QTensor):
        raise TypeError(f"out= must be a QTensor (e.g. from an earlier qkern.quantize of the same "
                        f"shape and format), got {type(out).__name__}")
    _check(out.format.name == fmt.name,
           lambda: f"has format {out.format.name}, quantizing to {fmt.name}")
    _check(out.layout == layout, lambda: f"has layout {out.layout}, this call needs {layout}")
    _check(out.codes is not None, "has no codes (a PackedQTensor's meta)")
    _tensor(out.codes, "codes", layout.shape, code_dtype, device)
    _tensor(out.scale, "scale", layout.scale_shape, torch.float32, device)
    want_zp = fmt.kind == "int" and not symmetric
    if want_zp:
        _check(out.zero_point is not None, "has no zero_point; symmetric=False needs one")
        _tensor(out.zero_point, "zero_point", layout.scale_shape, torch.int32, device)
    else:
        _check(out.zero_point is None, "has a zero_point; this call (symmetric) has none")


def out_views(out, layout, device):
    """(codes, scale, zero_point) of ``out`` as the flat tensors the ops write, or None when
    the kernels cannot write them directly (the result is then copied in by ``fill_out``)."""
    if out is None or device.type != "cpu" or not layout.in_kernel_order:
        return None
    zp = out.zero_point.view(-1) if out.zero_point is not None else out.scale.new_empty(
        0, dtype=torch.int32)
    return out.codes.view(-1), out.scale.view(-1), zp


def out_written(dst, codes, scale, zero_point) -> tuple[bool, bool, bool]:
    """Which of the kernel-order results are ``dst``'s views (the kernels wrote ``out``)."""
    if dst is None:
        return False, False, False
    return True, scale is dst[1], zero_point is dst[2]


def fill_out(out, codes, scale, zero_point, done=(False, False, False), **meta):
    """``out`` holding the result: copied in except where the kernels wrote it (``done``, from
    ``out_written``), its metadata updated; returns ``out``."""
    if not done[0]:
        out.codes.copy_(codes)
    if not done[1]:
        out.scale.copy_(scale)
    if zero_point is not None and not done[2]:
        out.zero_point.copy_(zero_point)
    for k, v in meta.items():
        setattr(out, k, v)
    return out


def check_dequantize_out(out, shape, dtype, device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out= must be a tensor, got {type(out).__name__}")
    _tensor(out, "tensor", shape, dtype, device)
