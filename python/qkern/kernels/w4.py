"""int4 group-wise weights on qkern::gemm_w4 ("w4_exact", "w4_fast")."""

from __future__ import annotations

import torch

from ..ops import w4
from ..ops.tiles import group_error
from ..tensor import QTensor
from .base import Kernel, need_format, need_groups, need_midtread, register


@register
class W4(Kernel):
    names = ("w4_exact", "w4_fast")
    order = 10

    def claims(self, q: QTensor) -> bool:
        return q.format.name == "int4"

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        return (need_format(q, ("int4",)) or need_groups(q, group_error)
                or need_midtread(q))

    def name(self, q: QTensor, act: str, mode: str) -> str:
        return f"w4_{mode}"

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        packed = w4.pack_weight(q.codes, q.scale, q.zero_point, q.group_size)
        return {f"w4_{name}": t for name, t in packed.items() if isinstance(t, torch.Tensor)}

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return torch.ops.qkern.gemm_w4(x2, bufs["w4_packed"], bufs["w4_scales"],
                                       bufs.get("w4_zeros"), bias, n, k, q.group_size,
                                       0 if name == "w4_exact" else 1)

    def float_twin(self, name: str) -> str:
        return "w4_exact"
