"""2-bit and 3-bit group-wise weights on qkern::gemm_w23 ("w23_exact", "w23_fast"); uint2 / uint3
with float zero points (HQQ) run with ``(float(u) - z) * s``, exactly ``QTensor.dequantize``."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..ops import checks, w23
from ..ops.raw import contig, ptr
from ..ops.tiles import group_error, split_zeros
from ..tensor import QTensor
from .base import (
    Kernel,
    need_format,
    need_groups,
    need_midtread,
    need_unsigned_float_zero,
    one_row,
    register,
)

FORMATS = ("int2", "int3", "uint2", "uint3")


@register
class W23(Kernel):
    names = ("w23_exact", "w23_fast")
    order = 20

    def claims(self, q: QTensor) -> bool:
        return q.format.name in FORMATS

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        return (need_format(q, FORMATS) or need_groups(q, group_error) or need_midtread(q)
                or need_unsigned_float_zero(q))

    def name(self, q: QTensor, act: str, mode: str) -> str:
        return f"w23_{mode}"

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        packed = w23.pack_weight(q.codes, q.scale, q.zero_point, q.group_size, q.format.bits,
                                 signed=q.format.signed)
        return {f"w23_{name}": t for name, t in packed.items() if isinstance(t, torch.Tensor)}

    def plan(self, name, bufs, bias, n, k, q):
        packed, scales, zeros = bufs["w23_packed"], bufs["w23_scales"], bufs.get("w23_zeros")
        mode, g = 0 if name == "w23_exact" else 1, q.group_size
        bits, qmin = q.format.bits, q.format.qmin
        checks.gemm_w23(one_row(k), packed, scales, zeros, bias, n, k, g, bits, qmin, mode)
        packed, scales = packed.contiguous(), contig(scales, torch.float32)
        (zeros, zeros_f), bias = split_zeros(zeros), contig(bias, torch.float32)
        keep = (packed, scales, zeros, zeros_f, bias)  # alive as long as the plan
        a = [ptr(t) for t in keep]
        return lambda x2, keep=keep: w23.run_gemm_w23(x2, *a, n, k, g, bits, qmin, mode)

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_w23(x2, bufs["w23_packed"], bufs["w23_scales"],
                                        bufs.get("w23_zeros"), bias, n, k, q.group_size,
                                        q.format.bits, q.format.qmin,
                                        0 if name == "w23_exact" else 1)

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        n, k = q.shape
        bits = q.format.bits
        codes, scales, zeros = w23.unpack_weight({
            "packed": bufs["w23_packed"], "scales": bufs["w23_scales"],
            "zeros": bufs.get("w23_zeros"), "N": n, "K": k, "bits": bits,
            "qmin": w23.code_range(bits, q.format.signed)[0]})
        return replace(q, codes=codes, scale=scales, zero_point=zeros)

    def float_twin(self, name: str) -> str:
        return "w23_exact"
