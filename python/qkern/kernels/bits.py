"""1-bit and 1.58-bit weights, one scale per output channel, on qkern::gemm_binary ("binary",
"binary_xnor": XNOR-Net sign activations) and qkern::gemm_ternary ("ternary")."""

from __future__ import annotations

import torch

from ..ops import bits, checks
from ..ops.raw import contig, ptr
from ..tensor import QTensor
from .base import Kernel, need_format, need_midtread, need_per_row, one_row, register


def _plan_bits(op: str, ternary: bool, xnor: bool, bufs, bias, n: int, k: int):
    w, alpha = bufs["bits_w"], bufs["bits_alpha"]
    checks.gemm_bits(op, one_row(k), w, alpha, bias, n, k)
    w, alpha, bias = w.contiguous(), contig(alpha, torch.float32), contig(bias, torch.float32)
    keep = (w, alpha, bias)  # alive as long as the plan
    a = [ptr(t) for t in keep]
    return lambda x2, keep=keep: bits.run_gemm_bits(ternary, x2, *a, n, k, xnor)


@register
class Binary(Kernel):
    names = ("binary",)
    order = 30

    def claims(self, q: QTensor) -> bool:
        return q.format.name == "binary"

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        return need_format(q, ("binary",)) or need_per_row(q) or need_midtread(q)

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        alpha = q.scale.float().reshape(-1).contiguous()
        return {"bits_w": bits.pack_binary(q.codes.view(torch.uint8)), "bits_alpha": alpha}

    def plan(self, name, bufs, bias, n, k, q):
        return _plan_bits("gemm_binary", False, name == "binary_xnor", bufs, bias, n, k)

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_binary(x2, bufs["bits_w"], bufs["bits_alpha"], bias, n, k,
                                           name == "binary_xnor")


@register
class BinaryXnor(Binary):
    names = ("binary_xnor",)
    acts = ("binary",)
    order = 31
    needs = "binary weights per output channel (midtread)"

    def float_twin(self, name: str) -> str:
        return "binary"


@register
class Ternary(Kernel):
    names = ("ternary",)
    order = 32

    def claims(self, q: QTensor) -> bool:
        return q.format.name == "ternary"

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        return need_format(q, ("ternary",)) or need_per_row(q) or need_midtread(q)

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        alpha = q.scale.float().reshape(-1).contiguous()
        return {"bits_w": bits.pack_ternary(q.codes), "bits_alpha": alpha}

    def plan(self, name, bufs, bias, n, k, q):
        return _plan_bits("gemm_ternary", True, False, bufs, bias, n, k)

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_ternary(x2, bufs["bits_w"], bufs["bits_alpha"], bias, n, k)
