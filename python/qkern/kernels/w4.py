"""int4 / uint4 group-wise weights on qkern::gemm_w4 ("w4_exact", "w4_fast").

uint4 codes ``u`` run as int4 codes ``u - 8`` with zero points ``z - 8`` (exact integers), or,
for float zero points (HQQ), with the float zero points of the stored nibble ``u`` itself:
the kernel then computes with ``(float(u) - z) * s``, exactly ``QTensor.dequantize``."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..ops import checks, w4
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


@register
class W4(Kernel):
    names = ("w4_exact", "w4_fast")
    order = 10

    def claims(self, q: QTensor) -> bool:
        return q.format.name in ("int4", "uint4")

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        return (need_format(q, ("int4", "uint4")) or need_groups(q, group_error)
                or need_midtread(q) or need_unsigned_float_zero(q))

    def name(self, q: QTensor, act: str, mode: str) -> str:
        return f"w4_{mode}"

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        codes, zeros = q.codes, q.zero_point
        if not q.format.signed:  # uint4: stored nibble u = q, int4 code u - 8
            codes = (codes.to(torch.int16) - 8).to(torch.int8)
            if zeros is None:
                zeros = torch.full(q.scale.shape, -8, dtype=torch.int32)
            elif not zeros.is_floating_point():
                zeros = zeros.to(torch.int32) - 8
        packed = w4.pack_weight(codes, q.scale, zeros, q.group_size)
        return {f"w4_{name}": t for name, t in packed.items() if isinstance(t, torch.Tensor)}

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_w4(x2, bufs["w4_packed"], bufs["w4_scales"],
                                       bufs.get("w4_zeros"), bias, n, k, q.group_size,
                                       0 if name == "w4_exact" else 1)

    def float_twin(self, name: str) -> str:
        return "w4_exact"

    def plan(self, name, bufs, bias, n, k, q):
        packed, scales, zeros = bufs["w4_packed"], bufs["w4_scales"], bufs.get("w4_zeros")
        mode = 0 if name == "w4_exact" else 1
        checks.gemm_w4(one_row(k), packed, scales, zeros, bias, n, k, q.group_size, mode)
        packed, scales = packed.contiguous(), contig(scales, torch.float32)
        (zeros, zeros_f), bias = split_zeros(zeros), contig(bias, torch.float32)
        keep = (packed, scales, zeros, zeros_f, bias)  # alive as long as the plan
        a = [ptr(t) for t in keep]
        g = q.group_size
        return lambda x2, keep=keep: w4.run_gemm_w4(x2, *a, n, k, g, mode)

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        n, k = q.shape
        codes, scales, zeros = w4.unpack_weight({"packed": bufs["w4_packed"], "N": n, "K": k,
                                                 "scales": bufs["w4_scales"],
                                                 "zeros": bufs.get("w4_zeros")})
        if not q.format.signed:  # stored as int4 codes u - 8 and zero points z - 8
            codes = (codes.to(torch.int16) + 8).to(torch.uint8)
            if zeros is not None and not zeros.is_floating_point():
                zeros = zeros + 8
            if q.zero_point is None:
                zeros = None
        return replace(q, codes=codes, scale=scales, zero_point=zeros)
