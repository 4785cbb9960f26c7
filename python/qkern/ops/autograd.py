"""Autograd of the quantized matmuls (``torch.library.register_autograd``).

Every matmul op ``y = x @ W^T (+ bias)`` gets the gradient with respect to its activations
through the same weights, ``grad_x = grad_y @ W``, and ``grad_bias = grad_y`` summed over the
rows when the bias requires grad. ``W`` is the float32 weight the op computes with, decoded in
the backward from the op's own packed buffers (torch ops only: any device, traceable by
torch.compile) a block of output rows at a time, so the backward holds at most about
``CHUNK_ELEMENTS`` decoded floats besides ``grad_x``; nothing is cached between calls.

The ops that quantize the activations on the fly (gemm_w4 / gemm_w23 ``mode=1``,
gemm_lut4_fast, gemm_w8a8,
gemm_w8a8_mixed's int8 columns, gemm_binary ``xnor=True``, and the int8-activation path of
``ste_w8``) use the straight-through estimator: the activation quantizer's derivative is taken
as 1, so their gradient is that of ``x @ W^T`` with the same ``W`` (README, "Training through
quantized layers").

A quantized weight is frozen: when one of its float buffers (scales, tables, ...) requires grad
the op raises RuntimeError at the forward instead of dropping that gradient silently. Integer
buffers cannot require grad at all.

``qkern::ste_w8(y, x, packed_w, w_scale, N, K)`` returns a copy of ``y`` (an int8-weight
product computed by the caller from quantized activations: QuantLinear's w8a8_tensor and
w8a8_static kernels) whose backward gives ``y``'s gradient to ``y`` and ``grad_y @ W`` to ``x``.
"""

from __future__ import annotations

import torch

from . import checks
from .lut4 import dq_scales
from .schemas import LIB
from .vq import decode_vq, unpack_codes
from .vq8 import decode_vq8

__all__ = ["CHUNK_ELEMENTS", "FROZEN", "decode_rows", "frozen_error"]

CHUNK_ELEMENTS = 1 << 22  # decoded weight floats per backward step (16 MiB of float32)

# the float buffers of each op's quantized weight (their requires_grad is an error)
FROZEN = {
    "gemm_w4": ("scales",),
    "gemm_w23": ("scales",),
    "gemm_lut4": ("scales", "table"),
    "gemm_lut4_dq": ("scale2", "mean", "table"),
    "gemm_lut4_fast": ("scales",),
    "gemm_fp8": ("scales",),
    "gemm_binary": ("alpha",),
    "gemm_ternary": ("alpha",),
    "gemm_w8a8": ("w_scale",),
    "gemm_w8a16": ("w_scale",),
    "ste_w8": ("w_scale",),
    "gemm_w8a8_mixed": ("w_scale",),
    "gemm_vq": ("codebooks", "scales"),
    "gemm_vq8": ("book_scales", "scales"),
}
_ROWS = {"gemm_w4": 8, "gemm_w23": 8, "gemm_lut4_fast": 8, "gemm_binary": 8, "gemm_ternary": 8,
         "gemm_w8a8": 16,
         "gemm_w8a16": 16, "ste_w8": 16,
         "gemm_w8a8_mixed": 16, "gemm_vq": 16,
         "gemm_vq8": 16}  # rows per tile of the packed layout (1: plain rows)


def frozen_error(op: str, name: str) -> RuntimeError:
    return RuntimeError(
        f"qkern::{op}: {name} requires grad, but a quantized weight is frozen: the quantized "
        "matmuls give gradients with respect to x (and bias) only. Keep the packed buffers "
        "with requires_grad=False; to train the weight, train a float weight through "
        "qkern.fake_quantize (straight-through) or a float adapter beside the layer")


def _u8(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of ``t``'s bytes (bit fields extract cleanly)."""
    t = t.reshape(-1)
    return t.view(torch.uint8) if t.dtype == torch.int8 else t


def _untile(p: torch.Tensor, t0: int, t1: int, ng: int) -> torch.Tensor:
    """Rows 8 t0 .. 8 t1 of tile-layout scales / zeros (N_pad // 8, ng, 8) -> (rows, ng)."""
    return p.reshape(-1, ng, 8)[t0:t1].transpose(1, 2).reshape(-1, ng)


def _scaled(w: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """w (rows, K) float32 times its group's scale s (rows, K // group_size): one product."""
    rows, k = w.shape
    return (w.view(rows, -1, group_size) * s.float().unsqueeze(-1)).view(rows, k)


def _tiled_affine(a, u: torch.Tensor, t0: int, t1: int, qmin: int) -> torch.Tensor:
    """W = float(q - z) * s for the tiled int layouts (gemm_w4, gemm_w23), rows 8 t0 .. 8 t1;
    ``u`` the unsigned codes (rows, K), q = u + qmin (float(u) + float(qmin - z) is exact);
    float zero points z of u: (float(u) - z) * s, as the kernels decode them."""
    g = a["group_size"]
    ng = a["K"] // g
    rows = u.shape[0]
    w = u.float().view(rows, ng, g)
    if a["zeros"] is None:
        w = w + float(qmin)
    elif a["zeros"].is_floating_point():  # float zero points of u: (float(u) - z) * s
        w = w - _untile(a["zeros"], t0, t1, ng).float().unsqueeze(-1)
    else:
        w = w + (qmin - _untile(a["zeros"], t0, t1, ng).to(torch.int32)).float().unsqueeze(-1)
    return _scaled(w.view(rows, -1), _untile(a["scales"], t0, t1, ng), g)


def _w4_nibbles(a, t0: int, t1: int) -> torch.Tensor:
    # tile t, block b: 4 vectors i of 8 rows r x 4 bytes j; byte j = u[8i+j] | u[8i+4+j] << 4
    k = a["K"]
    v = _u8(a["packed"])[t0 * 4 * k:t1 * 4 * k].reshape(t1 - t0, k // 32, 4, 8, 4)
    v = v.permute(0, 3, 1, 2, 4)  # (t, r, b, i, j)
    u = torch.stack((v & 15, v >> 4), dim=4)  # (t, r, b, i, h, j): code 8i + 4h + j
    return u.reshape(-1, k)


def _w4(a, r0: int, r1: int) -> torch.Tensor:
    t0, t1 = r0 // 8, (r1 + 7) // 8
    return _tiled_affine(a, _w4_nibbles(a, t0, t1), t0, t1, -8)


def _lut4_fast(a, r0: int, r1: int) -> torch.Tensor:
    # gemm_w4's tiles holding table indices c: W = float(table8[c] - 128) * s (exact, then one
    # product)
    t0, t1 = r0 // 8, (r1 + 7) // 8
    c = _w4_nibbles(a, t0, t1)
    u = a["table8"].reshape(-1).to(torch.int32).index_select(0, c.reshape(-1).to(torch.int32))
    return _tiled_affine({**a, "zeros": None}, u.view(c.shape), t0, t1, -128)


def _w23(a, r0: int, r1: int) -> torch.Tensor:
    # csrc/cpu/gemm/w23/api.h: tile t, block b holds `bits` words per row
    k, bits, t0, t1 = a["K"], a["bits"], r0 // 8, (r1 + 7) // 8
    nb = k // 32
    v = _u8(a["packed"])[t0 * bits * k:t1 * bits * k].reshape(t1 - t0, nb, bits, 8, 4)
    v = v.permute(0, 3, 1, 2, 4)  # (t, r, b, i, j)
    if bits == 2:  # byte j of word i: u[16i + 4p + j] at bits 2p
        u = torch.stack([(v >> (2 * p)) & 3 for p in range(4)], dim=4)  # (t, r, b, i, p, j)
    else:  # c < 24: word c // 8, bits 3h of byte j; c = 24 + 4i + j: split over words i and 2
        head = torch.stack((v & 7, (v >> 3) & 7), dim=4).reshape(t1 - t0, 8, nb, 24)
        lo = (v[:, :, :, 0:2] >> 6) & 3  # (t, r, b, i, j)
        hi = torch.stack(((v[:, :, :, 2] >> 6) & 1, (v[:, :, :, 2] >> 7) & 1), dim=3)
        tail = (lo | (hi << 2)).reshape(t1 - t0, 8, nb, 8)
        u = torch.cat((head, tail), dim=3)
    return _tiled_affine(a, u.reshape(-1, k), t0, t1, a["qmin"])


def _lut4_rows(a, scales: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    k = a["K"]
    p = _u8(a["packed"])[r0 * k // 2:r1 * k // 2].reshape(r1 - r0, k // 2)
    codes = torch.stack((p & 15, p >> 4), dim=2).reshape(-1)  # even k: low nibble
    w = a["table"].reshape(-1).float().index_select(0, codes.to(torch.int32))
    return _scaled(w.view(r1 - r0, k), scales[r0:r1], a["group_size"])


def _lut4(a, r0: int, r1: int) -> torch.Tensor:
    return _lut4_rows(a, a["scales"].reshape(a["N"], -1), r0, r1)


def _lut4_dq(a, r0: int, r1: int) -> torch.Tensor:
    s = dq_scales(a["qscales"], a["scale2"], a["mean"], a["dq_group"]).reshape(a["N"], -1)
    return _lut4_rows(a, s, r0, r1)


def _fp8(a, r0: int, r1: int) -> torch.Tensor:
    k, g = a["K"], a["group_size"]
    dtype = torch.float8_e4m3fn if a["fmt"] == 0 else torch.float8_e5m2
    w = _u8(a["w"])[r0 * k:r1 * k].view(dtype).float().view(r1 - r0, k)
    s = a["scales"].reshape(a["N"], -1)[r0:r1]
    return _scaled(w, s, k if g == 0 else g)


def _bits(a, r0: int, r1: int, ternary: bool) -> torch.Tensor:
    # csrc/cpu/gemm/bits/api.h: tile t, block h, plane(s), lane r: word bit j = weight 30 h + j
    k, t0, t1 = a["K"], r0 // 8, (r1 + 7) // 8
    nb, planes = (k + 29) // 30, 2 if ternary else 1
    per_tile = nb * planes * 32
    v = _u8(a["wpacked" if ternary else "wbits"])[t0 * per_tile:t1 * per_tile]
    v = v.reshape(t1 - t0, nb, planes, 8, 4).permute(0, 3, 1, 2, 4).unsqueeze(-1)
    shifts = torch.arange(8, dtype=torch.uint8, device=v.device)
    b = ((v >> shifts) & 1).reshape(t1 - t0, 8, nb, planes, 32)[..., :30]  # (t, r, h, plane, j)
    rows = r1 - t0 * 8
    alpha = a["alpha"].reshape(-1)[t0 * 8:r1].float().reshape(-1, 1)
    if ternary:
        t = b[:, :, :, 0].to(torch.int8) - b[:, :, :, 1].to(torch.int8)
        return t.reshape(-1, nb * 30)[:rows, :k].float() * alpha
    neg = b[:, :, :, 0].reshape(-1, nb * 30)[:rows, :k].bool()
    return torch.where(neg, -alpha, alpha)


def _w8(a, r0: int, r1: int) -> torch.Tensor:
    # csrc/cpu/gemm/w8/api.h: packed[b * 16 Kp + s * 64 + j * 4 + t] = codes[16 b + j][4 s + t]
    k = a["K"]
    kp = (k + 3) // 4 * 4
    b0, b1 = r0 // 16, (r1 + 15) // 16
    v = a["packed_w"].reshape(-1)[b0 * 16 * kp:b1 * 16 * kp].view(torch.int8)
    codes = v.reshape(b1 - b0, kp // 4, 16, 4).permute(0, 2, 1, 3).reshape(-1, kp)
    s = a["w_scale"].reshape(-1)[b0 * 16:r1].float().reshape(-1, 1)
    return codes[:r1 - b0 * 16, :k].float() * s


_DECODE = {
    "gemm_w4": _w4,
    "gemm_w23": _w23,
    "gemm_lut4": _lut4,
    "gemm_lut4_dq": _lut4_dq,
    "gemm_lut4_fast": _lut4_fast,
    "gemm_fp8": _fp8,
    "gemm_binary": lambda a, r0, r1: _bits(a, r0, r1, False),
    "gemm_ternary": lambda a, r0, r1: _bits(a, r0, r1, True),
    "gemm_w8a8": _w8,
    "gemm_w8a16": _w8,
    "ste_w8": _w8,
    "gemm_w8a8_mixed": _w8,
    "gemm_vq": lambda a, r0, r1: decode_vq(
        unpack_codes(a["packed"], r0, r1, a["K"] // a["codebooks"].shape[2]), a["codebooks"],
        a["scales"], a["group_rows"], r0),
    "gemm_vq8": decode_vq8,
}


def decode_rows(op: str, args: dict, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0 .. r1`` of the float32 weight (N, K) op ``op`` computes with, from its
    arguments by schema name (``r0`` a multiple of the layout's tile rows)."""
    if r0 % _ROWS.get(op, 1):
        raise ValueError(f"decode_rows: r0 = {r0} is not a multiple of {_ROWS.get(op, 1)}")
    w = _DECODE[op](args, r0, r1)
    return w[:r1 - r0]


def _grad_x(op: str, args: dict, grad_y: torch.Tensor, x_shape, x_dtype) -> torch.Tensor:
    n, k = args["N"], args["K"]
    g = grad_y.reshape(-1, n).float()
    rows = _ROWS.get(op, 1)
    step = max(rows, CHUNK_ELEMENTS // max(k, 1) // rows * rows)
    gx = None
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        part = g[:, r0:r1] @ decode_rows(op, args, r0, r1)
        gx = part if gx is None else gx + part
    if gx is None:  # N == 0
        gx = g.new_zeros(g.shape[0], k)
    return gx.reshape(x_shape).to(x_dtype)


def _register(op: str) -> None:
    names = [arg.name for arg in getattr(torch.ops.qkern, op).default._schema.arguments]
    x_name = "x"
    bias_name = "bias" if "bias" in names else None

    def setup_context(ctx, inputs, output):
        args = dict(zip(names, inputs))
        for name in FROZEN[op]:
            t = args[name]
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise frozen_error(op, name)
        x = args[x_name]
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        bias = args.get(bias_name)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        keep = [nm for nm in names if nm not in (x_name, bias_name, "y")
                and isinstance(args[nm], torch.Tensor)]
        ctx.tensor_names = keep
        ctx.others = {nm: v for nm, v in args.items()
                      if nm not in keep and not isinstance(v, torch.Tensor)}
        ctx.save_for_backward(*[args[nm] for nm in keep])

    def backward(ctx, grad):
        args = dict(ctx.others)
        args.update(zip(ctx.tensor_names, ctx.saved_tensors))
        grads = dict.fromkeys(names)
        need = dict(zip(names, ctx.needs_input_grad))
        if need[x_name]:
            grads[x_name] = _grad_x(op, args, grad, ctx.x_shape, ctx.x_dtype)
        if bias_name is not None and need[bias_name]:
            shape, dtype = ctx.bias_meta
            grads[bias_name] = grad.reshape(-1, args["N"]).sum(0).reshape(shape).to(dtype)
        if "y" in names and need["y"]:
            grads["y"] = grad
        return tuple(grads[nm] for nm in names)

    torch.library.register_autograd(f"qkern::{op}", backward, setup_context=setup_context)


def _ste_w8(y, x, packed_w, w_scale, N, K):
    checks.gemm_w8("ste_w8", x, packed_w, w_scale, None, N, K)
    if tuple(y.shape) != (*x.shape[:-1], N) or not y.is_floating_point():
        raise ValueError(f"ste_w8: y must be a float tensor of shape {(*x.shape[:-1], N)}, got "
                         f"{y.dtype} {tuple(y.shape)}")
    return y.clone()


LIB.impl("ste_w8", _ste_w8, "CompositeExplicitAutograd")

for _op in FROZEN:
    _register(_op)
