"""4-bit codebook weights (nf4, fp4_e2m1, fp4_bnb, any 16-entry table) on qkern::gemm_lut4
("lut4"), with double-quantized scales on qkern::gemm_lut4_dq ("lut4_dq"), and with
``mode="fast"`` (plain float scales) on qkern::gemm_lut4_fast ("lut4_fast": an int8 table and
int8 activations on gemm_w4's fast kernels; double-quantized scales stay on lut4_dq)."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..ops import autograd, checks, lut4, lut4_fast
from ..ops.raw import contig, ptr
from ..ops.tiles import group_error as tile_group_error
from ..tensor import QTensor
from .base import Kernel, need_groups, one_row, register


def _table(q: QTensor) -> torch.Tensor:
    return torch.from_numpy(q.format.lut[:16].copy())


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) bytes -> (N, K) codes 0..15 (element k in the low nibble for even k)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _decoded_weight(kernel: Kernel, name: str, q: QTensor, bufs: dict[str, torch.Tensor],
                    scale_args: tuple) -> torch.Tensor:
    """Kernel.weight of the exact lut4 kernels on the CPU: the weight decoded as the kernels
    decode it (``scale_args``: scales, qscales, scale2, mean, dq_group of
    :func:`qkern.ops.lut4.decode_weight`); elsewhere the generic identity-rows product."""
    packed = bufs["lut4_packed"]
    if packed.device.type != "cpu":
        return Kernel.weight(kernel, name, q, bufs)
    n, k = q.shape
    return lut4.decode_weight(packed.contiguous(), *scale_args,
                              contig(bufs["lut4_table"], torch.float32), n, k, q.group_size)


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
        def run(x2, keep=keep):
            if lut4.use_decoded(x2.shape[0]):  # prefill
                return lut4.run_decoded(x2, packed, None, qs, s2, mean, dg, table, bias, n, k, g)
            return lut4.run_gemm_lut4_dq(x2, p, q8, sc2, mean, tb, bi, n, k, g, dg)
        return run

    def weight(self, name, q, bufs):
        dq = (bufs["lut4_qscales"].contiguous(), contig(bufs["lut4_scale2"], torch.float32),
              float(bufs["lut4_mean"].float().reshape(())), q.double_quant.group)
        return _decoded_weight(self, name, q, bufs, (None, *dq))

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

        def run(x2, keep=keep):
            if lut4.use_decoded(x2.shape[0]):  # prefill
                return lut4.run_decoded(x2, packed, scales, None, None, 0.0, 0, table, bias, n,
                                        k, g)
            return lut4.run_gemm_lut4(x2, *a, n, k, g)
        return run

    def weight(self, name, q, bufs):
        scales = contig(bufs["lut4_scales"], torch.float32)
        return _decoded_weight(self, name, q, bufs, (scales, None, None, 0.0, 0))

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_lut4(x2, bufs["lut4_packed"], bufs["lut4_scales"],
                                         bufs["lut4_table"], bias, n, k, q.group_size)


@register
class Lut4Fast(_Lut4Family):
    """``mode="fast"``: the table rounded to int8 (``t8 = round(table / tmax * 127)``, the
    scales times ``tmax / 127``) and the activations to int8 per block of 32, on gemm_w4's fast
    kernels (docs/numerics.md, "4-bit codebook fast mode").

    >>> import torch, qkern
    >>> lin = torch.nn.Linear(64, 16)
    >>> q = qkern.nn.QuantLinear.from_float(lin, "nf4", group_size=32, mode="fast")
    >>> q.kernel, q(torch.randn(2, 64)).shape
    ('lut4_fast', torch.Size([2, 16]))
    """

    names = ("lut4_fast",)
    order = 39  # before "lut4", which takes either mode

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        if not self.claims(q):
            return f"takes 4-bit codebook formats, not {q.format.name}"
        if mode != "fast":
            return "runs mode='fast' only"
        if q.double_quant is not None:
            return "double-quantized scales run on lut4_dq (exact)"
        return need_groups(q, tile_group_error)

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        w = lut4_fast.pack_weight(q.codes.view(torch.uint8), q.scale, _table(q), q.group_size)
        return {"lut4f_packed": w["packed"], "lut4f_scales": w["scales"],
                "lut4f_table8": w["table8"]}

    def _args(self, bufs, bias, n, k, q):
        return (bufs["lut4f_packed"], bufs["lut4f_scales"], bufs["lut4f_table8"], bias, n, k,
                q.group_size)

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_lut4_fast(x2, *self._args(bufs, bias, n, k, q))

    def plan(self, name, bufs, bias, n, k, q):
        packed, scales, t8, bias, n, k, g = self._args(bufs, bias, n, k, q)
        lut4_fast.check_args(one_row(k), packed, scales, t8, bias, n, k, g)
        packed, scales = packed.contiguous(), contig(scales, torch.float32)
        t8, bias = t8.contiguous(), contig(bias, torch.float32)
        keep = (packed, scales, t8, bias)  # alive as long as the plan
        a = [ptr(t) for t in keep]
        return lambda x2, keep=keep: lut4_fast.run_gemm_lut4_fast(x2, *a, n, k, g)

    def weight(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
        """t8[c] * s' (the weight the kernel computes with), decoded by the op's autograd."""
        packed, scales, t8, _, n, k, g = self._args(bufs, None, *q.shape, q)
        args = {"packed": packed, "scales": scales, "table8": t8, "N": n, "K": k,
                "group_size": g}
        return autograd.decode_rows("gemm_lut4_fast", args, 0, n)

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        """The codes exactly; the scales divided back by tmax / 127 (a float32 rounding off)."""
        n, k = q.shape
        codes, s = lut4_fast.unpack_weight({"packed": bufs["lut4f_packed"], "N": n, "K": k,
                                            "scales": bufs["lut4f_scales"]}, _table(q))
        return replace(q, codes=codes, scale=s.reshape(q.layout.scale_shape))
