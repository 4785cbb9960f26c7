"""FP8 weights (fp8_e4m3, fp8_e5m2), per output channel or in groups, on qkern::gemm_fp8."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..ops import checks, fp8
from ..ops.raw import contig, ptr
from ..tensor import QTensor
from .base import Kernel, need_format, need_groups, need_per_row, one_row, register


@register
class Fp8(Kernel):
    names = ("fp8",)
    order = 50

    def claims(self, q: QTensor) -> bool:
        return q.format.name in fp8.FORMATS

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        why = need_format(q, tuple(fp8.FORMATS))
        if why is not None or need_per_row(q) is None:
            return why
        return need_groups(q, fp8.group_error)

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        p = fp8.pack_weight(q.codes, q.scale, q.group_size, q.format.name)
        return {"fp8_w": p["w"], "fp8_scales": p["scales"]}

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        return replace(q, codes=bufs["fp8_w"].clone(),
                       scale=bufs["fp8_scales"].reshape(q.layout.scale_shape).clone())

    def plan(self, name, bufs, bias, n, k, q):
        w, scales, g, fmt = (bufs["fp8_w"], bufs["fp8_scales"], q.group_size or 0,
                             fp8.FORMATS[q.format.name])
        checks.gemm_fp8(one_row(k), w, scales, bias, n, k, g, fmt)
        w, scales, bias = w.contiguous(), contig(scales, torch.float32), contig(bias, torch.float32)
        keep = (w, scales, bias)  # alive as long as the plan
        a = [ptr(t) for t in keep]
        def run(x2, keep=keep):
            if fp8.use_decoded(x2.shape[0]):  # prefill
                return fp8.run_decoded(x2, w, scales, bias, n, k, g, fmt)
            return fp8.run_gemm_fp8(x2, *a, n, k, g, fmt)
        return run

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_fp8(x2, bufs["fp8_w"], bufs["fp8_scales"], bias, n, k,
                                        q.group_size or 0, fp8.FORMATS[q.format.name])
