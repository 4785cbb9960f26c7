"""4-bit codebook weights (nf4, fp4_e2m1, fp4_bnb, any 16-entry table) on qkern::gemm_lut4
("lut4") and, with double-quantized scales, qkern::gemm_lut4_dq ("lut4_dq")."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..ops import checks, lut4
from ..ops.raw import contig, ptr
from ..tensor import QTensor
from .base import Kernel, need_groups, one_row, register


def _table(q: QTensor) -> torch.Tensor:
    return torch.from_numpy(q.format.lut[:16].copy())


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) bytes -> (N, K) codes 0..15 (element k in the low nibble for even k)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


class _Lut4Family(Kernel):
    def claims(self, q: QTensor) -> bool:
        return q.format.kind == "codebook" and q.format.bits == 4

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        if not self.claims(q):
            return f"takes 4-bit codebook formats, not {q.format.name}"
        return need_groups(q, lut4.group_error)


@register
class Lut4Dq(_Lut4Family):
    """int8 block scales, rebuilt inside the kernel."""

    names = ("lut4_dq",)
    order = 40

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        why = super().reason(q, act, mode)
        return why or (None if q.double_quant is not None else "needs double-quantized scales")

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        p = lut4.pack_weight_dq(q.codes.view(torch.uint8), q.double_quant, q.group_size)
        return {"lut4_packed": p["packed"], "lut4_qscales": p["qscales"],
                "lut4_scale2": p["scale2"], "lut4_mean": p["mean"], "lut4_table": _table(q)}

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        n, k = q.shape
        dq = replace(q.double_quant, codes=bufs["lut4_qscales"].clone(),
                     scale2=bufs["lut4_scale2"].clone(), mean=float(bufs["lut4_mean"][0]))
        scales = lut4.dq_scales(dq.codes, dq.scale2, bufs["lut4_mean"], dq.group)
        return replace(q, codes=_codes(bufs["lut4_packed"]),
                       scale=scales.reshape(q.layout.scale_shape), double_quant=dq)

    def plan(self, name, bufs, bias, n, k, q):
        packed, qs, s2 = bufs["lut4_packed"], bufs["lut4_qscales"], bufs["lut4_scale2"]
        mean, table = bufs["lut4_mean"], bufs["lut4_table"]
        g, dg = q.group_size, q.double_quant.group
        checks.gemm_lut4_dq(one_row(k), packed, qs, s2, mean, table, bias, n, k, g, dg,
                            lut4.cpu_group_error)
        packed, qs, s2 = packed.contiguous(), qs.contiguous(), contig(s2, torch.float32)
        table, bias, mean = contig(table, torch.float32), contig(bias, torch.float32), float(mean)
        keep = (packed, qs, s2, table, bias)  # alive as long as the plan
        p, q8, sc2, tb, bi = (ptr(t) for t in keep)
        return lambda x2, keep=keep: lut4.run_gemm_lut4_dq(x2, p, q8, sc2, mean, tb, bi, n, k, g,
                                                           dg)

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_lut4_dq(x2, bufs["lut4_packed"], bufs["lut4_qscales"],
                                            bufs["lut4_scale2"], bufs["lut4_mean"],
                                            bufs["lut4_table"], bias, n, k, q.group_size,
                                            q.double_quant.group)


@register
class Lut4(_Lut4Family):
    names = ("lut4",)
    order = 41

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        why = super().reason(q, act, mode)
        return why or (None if q.double_quant is None else
                       "double-quantized scales run on lut4_dq")

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        p = lut4.pack_weight(q.codes.view(torch.uint8), q.scale, q.group_size)
        return {"lut4_packed": p["packed"], "lut4_scales": p["scales"], "lut4_table": _table(q)}

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        return replace(q, codes=_codes(bufs["lut4_packed"]),
                       scale=bufs["lut4_scales"].reshape(q.layout.scale_shape).clone())

    def plan(self, name, bufs, bias, n, k, q):
        packed, scales, table, g = (bufs["lut4_packed"], bufs["lut4_scales"],
                                    bufs["lut4_table"], q.group_size)
        checks.gemm_lut4("gemm_lut4", one_row(k), packed, scales, table, bias, n, k, g,
                         lut4.cpu_group_error)
        packed, scales = packed.contiguous(), contig(scales, torch.float32)
        table, bias = contig(table, torch.float32), contig(bias, torch.float32)
        keep = (packed, scales, table, bias)  # alive as long as the plan
        a = [ptr(t) for t in keep]
        return lambda x2, keep=keep: lut4.run_gemm_lut4(x2, *a, n, k, g)

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_lut4(x2, bufs["lut4_packed"], bufs["lut4_scales"],
                                         bufs["lut4_table"], bias, n, k, q.group_size)
