"""int8 weights per output channel (symmetric, midtread) on the int8 matmuls, one kernel per
activation mode: "w8a16" (float activations, qkern::gemm_w8a16), "w8a8" (int8 per token,
qkern::gemm_w8a8), "w8a8_tensor" (one dynamic scale per call) and "w8a8_static" (the
calibrated ``act_scale`` buffer), the last two on qkern::gemm_s8s8_s32."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..ops import checks, w8
from ..ops.raw import contig
from ..tensor import QTensor
from .base import Kernel, need_format, need_midtread, need_per_row, one_row, register

_OPS = torch.ops.qkern


@register
class W8a16(Kernel):
    names = ("w8a16",)
    order = 60
    needs = "int8 weights per output channel (symmetric, midtread)"

    def claims(self, q: QTensor) -> bool:
        return q.format.name == "int8"

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        why = need_format(q, ("int8",)) or need_per_row(q) or need_midtread(q)
        return why or (None if q.zero_point is None else "needs symmetric weights (no zero point)")

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        return {"w8_packed": w8.pack_w8(q.codes), "w8_scale": q.scale.float().contiguous()}

    a8 = False  # the float-activation kernel (W8a8 sets it)

    def plan(self, name, bufs, bias, n, k, q):
        if name not in ("w8a16", "w8a8"):
            return None  # one scale per tensor / static scale: the op path (quantize + s8s8)
        w, sw = bufs["w8_packed"], bufs["w8_scale"]
        checks.gemm_w8(f"gemm_{name}", one_row(k), w, sw, bias, n, k)
        w, sw, a8 = w.detach().contiguous(), contig(sw, torch.float32), self.a8
        bias = contig(bias, torch.float32)
        return lambda x2: w8.run_gemm_w8(a8, x2, w, sw, bias, n, k)

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return _OPS.gemm_w8a16(x2, bufs["w8_packed"], bufs["w8_scale"], bias, n, k)

    def float_twin(self, name: str) -> str:
        return "w8a16"

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        n, k = q.shape
        return replace(q, codes=w8.unpack_w8(bufs["w8_packed"], n, k),
                       scale=bufs["w8_scale"].reshape(q.layout.scale_shape).clone(),
                       zero_point=None)


@register
class W8a8(W8a16):
    """int8 activations per token (row of x)."""

    names = ("w8a8",)
    acts = ("int8_dynamic",)
    order = 61
    a8 = True

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return _OPS.gemm_w8a8(x2, bufs["w8_packed"], bufs["w8_scale"], bias, n, k)


def given_scale(x2: torch.Tensor, sx: torch.Tensor, bufs, bias, n: int, k: int):
    """int8 activations with one scale for the whole tensor (static, or per-tensor dynamic):
    xq = clamp(rne(x * (1 / sx)), -127, 127) by the qkern quantize op, the exact int32 core,
    then y = (float(acc) * sx) * sw[n] (+ bias[n]) like gemm_w8a8's epilogue."""
    sx = sx.reshape(1).float()
    if x2.numel() == 0:  # (0, K) or K = 0: y = 0 * sw (+ bias), as gemm_w8a8 defines it
        y = torch.zeros((x2.shape[0], n), dtype=torch.float32, device=x2.device)
        y = y * bufs["w8_scale"]
        return y if bias is None else y + bias
    # codes within [-127, 127]: 127 sx plays max|x| in the overflow bound. A compiled graph
    # cannot branch on sx's value: there the bound is not checked (docs/numerics.md)
    if not torch.compiler.is_compiling():
        checks.int8_act_bound("w8a8 (one activation scale)", 127.0 * float(sx), k, "K")
    xq = _OPS.quantize_affine(x2.reshape(-1), sx, None, x2.numel(), -127, 127, 0, 0, 0.0, 0)
    acc = _OPS.gemm_s8s8_s32(xq.view(torch.int8).view(x2.shape), bufs["w8_packed"], n, k)
    y = (acc.float() * sx) * bufs["w8_scale"]
    return y if bias is None else y + bias


def ste(y: torch.Tensor, x2: torch.Tensor, bufs, n: int, k: int) -> torch.Tensor:
    """y with the straight-through gradient of x2 @ W^T for x2 (qkern::ste_w8), when x2 needs
    one; y itself when not (inference pays no copy)."""
    if not (x2.requires_grad and torch.is_grad_enabled()):
        return y
    return _OPS.ste_w8(y, x2, bufs["w8_packed"], bufs["w8_scale"], n, k)


@register
class W8a8Tensor(W8a16):
    """int8 activations with one dynamic scale per call (amax / 127)."""

    names = ("w8a8_tensor",)
    acts = ("int8_dynamic_tensor",)
    order = 62

    def matmul(self, name, x2, bufs, bias, n, k, q):
        xd = x2.detach()  # no gradient through the scale: straight-through (ste_w8)
        amax = xd.abs().amax() if xd.numel() else xd.new_zeros(())
        sx = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        return ste(given_scale(xd, sx, bufs, bias, n, k), x2, bufs, n, k)


@register
class W8a8Static(W8a16):
    """int8 activations with the calibrated scale (the layer's ``act_scale`` buffer)."""

    names = ("w8a8_static",)
    acts = ("int8_static",)
    order = 63

    def matmul(self, name, x2, bufs, bias, n, k, q):
        y = given_scale(x2.detach(), bufs["act_scale"], bufs, bias, n, k)
        return ste(y, x2, bufs, n, k)
