"""Which matmul kernel a quantized weight runs on, its packed buffers, and the call.

``pack(qweight, act, mode)`` returns ``(kernel name, {buffer name: tensor})``; ``forward``
runs it. Formats without a fused kernel use "dequant": the codes stay bit-packed in memory and
are decoded by the qkern ops at each call, then ``F.linear`` (exact, and traceable by
torch.compile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import pack_bits
from ..tensor import QTensor

_OPS = torch.ops.qkern


def _w4_ok(q: QTensor, act: str) -> bool:
    return (q.format.name == "int4" and q.granularity == "group" and q.axis == 1
            and q.group_size in (32, 64, 128) and q.shape[1] % 32 == 0 and act == "none"
            and q.quantizer == "midtread" and _has("gemm_w4"))


def _w23_ok(q: QTensor, act: str) -> bool:
    return (q.format.name in ("int2", "int3", "uint2", "uint3") and q.granularity == "group"
            and q.axis == 1 and q.group_size in (32, 64, 128) and act == "none"
            and q.quantizer == "midtread" and _has("gemm_w23"))


def _w8_ok(q: QTensor) -> bool:
    return (q.format.name == "int8" and q.granularity == "channel" and q.axis == 0
            and q.zero_point is None and q.quantizer == "midtread" and _has("gemm_w8a8"))


def _lut4_ok(q: QTensor, act: str) -> bool:
    return (q.format.kind == "codebook" and q.format.bits == 4 and q.granularity == "group"
            and q.axis == 1 and q.group_size in (32, 64, 128) and act == "none"
            and _has("gemm_lut4"))


def _fp8_ok(q: QTensor, act: str) -> bool:
    per_row = q.granularity == "channel" and q.axis == 0
    grouped = q.granularity == "group" and q.axis == 1 and q.group_size in (32, 64, 128)
    return (q.format.name in ("fp8_e4m3", "fp8_e5m2") and (per_row or grouped)
            and act == "none" and _has("gemm_fp8"))


def _bits_ok(q: QTensor, act: str) -> bool:
    per_row = q.granularity == "channel" and q.axis == 0 and q.quantizer == "midtread"
    if q.format.name == "binary":
        return per_row and act in ("none", "binary") and _has("gemm_binary")
    return (q.format.name == "ternary" and per_row and act == "none"
            and _has("gemm_ternary"))


def _has(op: str) -> bool:
    return hasattr(_OPS, op)


def pack(q: QTensor, act: str, mode: str) -> tuple[str, dict[str, torch.Tensor]]:
    if _w4_ok(q, act):
        from ..ops import w4

        packed = w4.pack_weight(q.codes, q.scale, q.zero_point, q.group_size)
        bufs = {f"w4_{name}": t for name, t in packed.items() if isinstance(t, torch.Tensor)}
        return f"w4_{mode}", bufs
    if _w23_ok(q, act):
        from ..ops import w23

        packed = w23.pack_weight(q.codes, q.scale, q.zero_point, q.group_size, q.format.bits,
                                 signed=q.format.signed)
        bufs = {f"w23_{name}": t for name, t in packed.items() if isinstance(t, torch.Tensor)}
        return f"w23_{mode}", bufs
    if act == "binary" and q.format.name != "binary":
        raise ValueError("act='binary' (XNOR-Net activations) needs binary weights")
    if _bits_ok(q, act):
        from ..ops import bits

        alpha = q.scale.float().reshape(-1).contiguous()
        if q.format.name == "binary":
            name = "binary_xnor" if act == "binary" else "binary"
            wbits = bits.pack_binary(q.codes.view(torch.uint8))
            return name, {"bits_w": wbits, "bits_alpha": alpha}
        return "ternary", {"bits_w": bits.pack_ternary(q.codes), "bits_alpha": alpha}
    if _lut4_ok(q, act):
        from ..ops import lut4

        table = torch.from_numpy(q.format.lut[:16].copy())
        if q.double_quant is not None:  # int8 block scales, rebuilt inside the kernel
            p = lut4.pack_weight_dq(q.codes.view(torch.uint8), q.double_quant, q.group_size)
            return "lut4_dq", {"lut4_packed": p["packed"], "lut4_qscales": p["qscales"],
                               "lut4_scale2": p["scale2"], "lut4_mean": p["mean"],
                               "lut4_table": table}
        p = lut4.pack_weight(q.codes.view(torch.uint8), q.scale, q.group_size)
        return "lut4", {"lut4_packed": p["packed"], "lut4_scales": p["scales"],
                        "lut4_table": table}
    if _fp8_ok(q, act):
        from ..ops import fp8

        p = fp8.pack_weight(q.codes, q.scale, q.group_size, q.format.name)
        return "fp8", {"fp8_w": p["w"], "fp8_scales": p["scales"]}
    if _w8_ok(q):
        from ..ops import w8

        bufs = {"w8_packed": w8.pack_w8(q.codes), "w8_scale": q.scale.float().contiguous()}
        return W8_KERNELS[act], bufs
    if act != "none":
        raise ValueError(f"act={act!r} needs int8 weights per output channel (symmetric, "
                         f"midtread); got {q.format.name} per {q.granularity}")
    return "dequant", _dequant_buffers(q)


def _dequant_buffers(q: QTensor) -> dict[str, torch.Tensor]:
    fmt, lay = q.format, q.layout
    bufs = {"scale": lay.scale_to_kernel(q.scale.float())}
    if fmt.kind == "int":  # store code - qmin (unsigned), fold qmin into the zero point
        codes = (lay.to_kernel(q.codes).to(torch.int32) - fmt.qmin).to(torch.uint8)
        zp = torch.zeros_like(bufs["scale"], dtype=torch.int32) if q.zero_point is None \
            else lay.scale_to_kernel(q.zero_point).to(torch.int32)
        bufs["zp"] = zp - fmt.qmin
    else:
        codes = lay.to_kernel(q.codes.view(torch.uint8))
        bufs["lut"] = torch.from_numpy(fmt.lut.copy())
    bufs["codes_packed"] = pack_bits(codes, fmt.bits)
    return bufs


def dequant_weight(q: QTensor, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
    fmt, lay = q.format, q.layout
    codes = _OPS.unpack_bits(bufs["codes_packed"], fmt.bits, lay.numel, False)
    if fmt.kind == "int":
        offset = 0.5 if q.quantizer == "midrise" else 0.0
        flat = _OPS.dequantize_affine(codes, bufs["scale"], bufs["zp"], lay.group_size, False,
                                      offset)
    else:
        flat = _OPS.dequantize_lut(codes, bufs["scale"], bufs["lut"], lay.group_size)
    return lay.from_kernel(flat)


# The float-activation kernel over the same buffers (one float product per weight).
_FLOAT_TWIN = {"w4_fast": "w4_exact", "w23_fast": "w23_exact", "binary_xnor": "binary",
               "w8a8": "w8a16", "w8a8_tensor": "w8a16", "w8a8_static": "w8a16"}
# int8 weights per output channel: the kernel for each activation mode
W8_KERNELS = {"none": "w8a16", "int8_dynamic": "w8a8", "int8_dynamic_tensor": "w8a8_tensor",
              "int8_static": "w8a8_static"}
INT8_ACTS = ("int8_dynamic_tensor", "int8_static")  # need int8 per-channel weights


def _w8a8_given_scale(x2: torch.Tensor, sx: torch.Tensor, bufs, bias, n: int, k: int):
    """int8 activations with one scale for the whole tensor (static, or per-tensor dynamic):
    xq = clamp(rne(x * (1 / sx)), -127, 127) by the qkern quantize op, the exact int32 core,
    then y = (float(acc) * sx) * sw[n] (+ bias[n]) like gemm_w8a8's epilogue."""
    sx = sx.reshape(1).float()
    xq = _OPS.quantize_affine(x2.reshape(-1), sx, None, x2.numel(), -127, 127, 0, 0, 0.0, 0)
    acc = _OPS.gemm_s8s8_s32(xq.view(torch.int8).view(x2.shape), bufs["w8_packed"], n, k)
    y = (acc.float() * sx) * bufs["w8_scale"]
    return y if bias is None else y + bias


def weight(kernel: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight (out, in) a kernel computes with, decoded from its buffers: rows of
    the identity pushed through the kernel itself (W^T = I @ W^T), a block of rows at a time so
    that memory stays O(block * (in + out))."""
    if kernel == "dequant":
        return dequant_weight(q, bufs)
    n, k = q.shape
    kernel = _FLOAT_TWIN.get(kernel, kernel)
    dev = next(iter(bufs.values())).device  # the identity goes where the layer lives
    out = torch.empty(n, k, dtype=torch.float32, device=dev)
    for k0 in range(0, k, 256):
        k1 = min(k, k0 + 256)
        eye = torch.zeros(k1 - k0, k, dtype=torch.float32, device=dev)
        eye[:, k0:k1] = torch.eye(k1 - k0, device=dev)
        out[:, k0:k1] = forward(kernel, eye, bufs, None, n, k, q).T
    return out


def forward(kernel: str, x: torch.Tensor, bufs: dict[str, torch.Tensor],
            bias: torch.Tensor | None, n: int, k: int, q: QTensor) -> torch.Tensor:
    if kernel == "dequant":
        w = dequant_weight(q, bufs)
        return F.linear(x.float(), w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).float().contiguous()
    if kernel.startswith("w4_"):
        y = _OPS.gemm_w4(x2, bufs["w4_packed"], bufs["w4_scales"], bufs.get("w4_zeros"), bias,
                         n, k, q.group_size, 0 if kernel == "w4_exact" else 1)
    elif kernel.startswith("w23_"):
        y = _OPS.gemm_w23(x2, bufs["w23_packed"], bufs["w23_scales"], bufs.get("w23_zeros"),
                          bias, n, k, q.group_size, q.format.bits, q.format.qmin,
                          0 if kernel == "w23_exact" else 1)
    elif kernel == "lut4":
        y = _OPS.gemm_lut4(x2, bufs["lut4_packed"], bufs["lut4_scales"], bufs["lut4_table"],
                           bias, n, k, q.group_size)
    elif kernel == "lut4_dq":
        y = _OPS.gemm_lut4_dq(x2, bufs["lut4_packed"], bufs["lut4_qscales"], bufs["lut4_scale2"],
                              bufs["lut4_mean"], bufs["lut4_table"], bias, n, k, q.group_size,
                              q.double_quant.group)
    elif kernel == "fp8":
        y = _OPS.gemm_fp8(x2, bufs["fp8_w"], bufs["fp8_scales"], bias, n, k,
                          q.group_size or 0, 0 if q.format.name == "fp8_e4m3" else 1)
    elif kernel in ("binary", "binary_xnor"):
        y = _OPS.gemm_binary(x2, bufs["bits_w"], bufs["bits_alpha"], bias, n, k,
                             kernel == "binary_xnor")
    elif kernel == "ternary":
        y = _OPS.gemm_ternary(x2, bufs["bits_w"], bufs["bits_alpha"], bias, n, k)
    elif kernel == "w8a8":
        y = _OPS.gemm_w8a8(x2, bufs["w8_packed"], bufs["w8_scale"], bias, n, k)
    elif kernel == "w8a8_static":
        y = _w8a8_given_scale(x2, bufs["act_scale"], bufs, bias, n, k)
    elif kernel == "w8a8_tensor":
        amax = x2.abs().amax() if x2.numel() else x2.new_zeros(())
        sx = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        y = _w8a8_given_scale(x2, sx, bufs, bias, n, k)
    else:
        y = _OPS.gemm_w8a16(x2, bufs["w8_packed"], bufs["w8_scale"], bias, n, k)
    return y.reshape(*lead, n)
