"""The fallback "dequant" kernel: the codes stay bit-packed in memory and are decoded by the
qkern ops at each call, then ``F.linear`` (exact, and traceable by torch.compile). Any weight
format works; :func:`qkern.kernels.select` picks it only when no fused kernel takes the
weight, and says why."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..packing import pack_bits
from ..tensor import QTensor
from .base import FALLBACK, Kernel, register

_OPS = torch.ops.qkern


def dequant_weight(q: QTensor, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
    fmt, lay = q.format, q.layout
    codes = _OPS.unpack_bits(bufs["codes_packed"], fmt.bits, lay.numel, False)
    if fmt.kind == "int" and bufs["zp"].is_floating_point():  # float zero points (HQQ)
        v = codes.float().view(-1, lay.group_size) + float(fmt.qmin)  # the code q, exactly
        if q.quantizer == "midrise":
            v = v + 0.5
        flat = ((v - bufs["zp"].view(-1, 1)) * bufs["scale"].view(-1, 1)).view(-1)
    elif fmt.kind == "int":
        offset = 0.5 if q.quantizer == "midrise" else 0.0
        flat = _OPS.dequantize_affine(codes, bufs["scale"], bufs["zp"], lay.group_size, False,
                                      offset)
    else:
        flat = _OPS.dequantize_lut(codes, bufs["scale"], bufs["lut"], lay.group_size)
    return lay.from_kernel(flat)


@register
class Dequant(Kernel):
    names = (FALLBACK,)
    order = 1000  # last: select() falls back to it

    def claims(self, q: QTensor) -> bool:
        return False

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        return None

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        fmt, lay = q.format, q.layout
        bufs = {"scale": lay.scale_to_kernel(q.scale.float())}
        if fmt.kind == "int":  # store code - qmin (unsigned), fold qmin into the zero point
            codes = (lay.to_kernel(q.codes).to(torch.int32) - fmt.qmin).to(torch.uint8)
            if q.zero_point is not None and q.zero_point.is_floating_point():
                bufs["zp"] = lay.scale_to_kernel(q.zero_point).float()  # as given, not - qmin
            else:
                zp = torch.zeros_like(bufs["scale"], dtype=torch.int32) if q.zero_point is None \
                    else lay.scale_to_kernel(q.zero_point).to(torch.int32)
                bufs["zp"] = zp - fmt.qmin
        else:
            codes = lay.to_kernel(q.codes.view(torch.uint8))
            bufs["lut"] = torch.from_numpy(fmt.lut.copy())
        bufs["codes_packed"] = pack_bits(codes, fmt.bits)
        return bufs

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        fmt, lay = q.format, q.layout
        u = _OPS.unpack_bits(bufs["codes_packed"], fmt.bits, lay.numel, False)
        scale = lay.scale_from_kernel(bufs["scale"].float())
        zp = bufs.get("zp")
        if fmt.kind != "int":
            return replace(q, codes=lay.from_kernel(u.to(torch.uint8)), scale=scale)
        codes = (u.to(torch.int32) + fmt.qmin).to(torch.int8 if fmt.signed else torch.uint8)
        if q.zero_point is None:
            zero = None
        elif zp.is_floating_point():
            zero = lay.scale_from_kernel(zp)
        else:
            zero = lay.scale_from_kernel(zp + fmt.qmin).to(torch.int32)
        return replace(q, codes=lay.from_kernel(codes), scale=scale, zero_point=zero)

    def forward(self, name, x, bufs, bias, n, k, q):
        return F.linear(x.float(), dequant_weight(q, bufs), bias)

    def weight(self, name, q, bufs):
        return dequant_weight(q, bufs)
