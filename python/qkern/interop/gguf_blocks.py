"""GGUF blocks written from qkern: the encoders of qkern QTensors' codes (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q6_K) and
the Q4_K and Q6_K encoders of float rows, in numpy (the ``gguf`` package decodes them but does not
encode them), written from ggml's reference rows ``quantize_row_q4_K_ref`` /
``quantize_row_q6_K_ref`` (ggml/src/ggml-quants.c) without an importance matrix.

Super-blocks of QK_K = 256 values along a row:

* **Q4_K** (144 bytes, 4.5 bits/weight): ``d`` fp16, ``dmin`` fp16, 12 bytes holding eight 6-bit
  scales ``sc`` and eight 6-bit mins ``m`` (one per 32 values), 128 bytes of 4-bit codes ``q``;
  value = ``d * sc * q - dmin * m``. Each 32-value sub-block's scale and min are searched by
  ``make_qkx2_quants`` (weighted least squares over 21 candidate scales, weights
  ``sqrt(mean(x^2)) + |x|``), then quantized to 6 bits against the super-block maxima.
* **Q6_K** (210 bytes, 6.5625 bits/weight): 128 bytes of low nibbles, 64 bytes of high 2-bit
  pairs, sixteen int8 scales ``sc`` (one per 16 values), ``d`` fp16; value =
  ``d * sc * (q - 32)``. Each 16-value scale is searched by ``make_qx_quants`` (rmse_type 1:
  weights x^2, 19 candidates), then quantized to int8 against the largest.

Arithmetic is float32 in ggml's order (sums run in index order, ``cumsum``); ``nearest_int`` is
round-half-to-even (``np.rint``). On the wikitext-bytelm these encoders give the same bytes as
llama.cpp's own quantizer (``llama_model_quantize``, x86-64 build) for every Q4_K and Q6_K
tensor (tests/test_interop_gguf.py). A build whose compiler contracts ggml's products into
fused multiply-adds (ggml-base is compiled without -march on x86; aarch64 compilers contract by
default) could differ in the last bit of a scale search on a rare block; the encoding is valid
either way and decodes with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tensor import QTensor

__all__ = ["LEGACY", "QK_K", "centered", "fp16_exact", "legacy_blocks", "q6_k_exact",
           "quantize_q4_k", "quantize_q6_k"]

QK_K = 256
_F32 = np.float32
_EPS = _F32(1e-15)  # GROUP_MAX_EPS


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis in index order, in float32 (as ggml's loops)."""
    return np.cumsum(a, axis=-1, dtype=_F32)[..., -1]


def _rint(a: np.ndarray) -> np.ndarray:
    return np.rint(a).astype(np.int32)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=_F32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} values, got {x.shape}")
    return x.reshape(-1, QK_K)


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
               nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants over rows of ``x`` (weights ``w``): (scale, -min, codes)."""
    mn = np.minimum(x.min(-1), _F32(0))
    mx = x.max(-1)
    sum_w, sum_x = _sum(w), _sum(w * x)
    flat = mx == mn
    rng = np.where(flat, _F32(1), mx - mn)
    iscale = _F32(nmax) / rng
    scale = _F32(1) / iscale
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(_F32) + mn[:, None] - x
    best = _sum(w * (diff * diff))
    for i in range(nstep + 1):  # ggml updates min as it goes: later steps use the new one
        rng = np.where(flat, _F32(1), mx - mn)
        isc = (_F32(rmin) + _F32(rdelta) * _F32(i) + _F32(nmax)) / rng
        la = np.clip(_rint(isc[:, None] * (x - mn[:, None])), 0, nmax)
        lf = la.astype(_F32)
        s_l, s_l2, s_xl = _sum(w * lf), _sum(w * lf * lf), _sum(w * lf * x)
        D = sum_w * s_l2 - s_l * s_l
        ok = D > 0
        Ds = np.where(ok, D, _F32(1))
        this_scale = (sum_w * s_xl - sum_x * s_l) / Ds
        this_min = (s_l2 * sum_x - s_l * s_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, _F32(0), this_min)
        this_scale = np.where(pos, s_xl / np.where(s_l2 > 0, s_l2, _F32(1)), this_scale)
        d = this_scale[:, None] * lf + this_min[:, None] - x
        cur = _sum(w * (d * d))
        better = ok & (cur < best) & ~flat
        L = np.where(better[:, None], la, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, _F32(0), scale)
    return scale.astype(_F32), (-mn).astype(_F32), L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows ``x`` (n, k) float32, k a multiple of 256 -> Q4_K bytes (n, k // 256 * 144)."""
    n_rows = np.asarray(x).shape[0]
    xb = _blocks(x)
    nb = xb.shape[0]
    sub = xb.reshape(nb * 8, 32)
    av = np.sqrt(_sum(sub * sub) / _F32(32))
    w = av[:, None] + np.abs(sub)
    scales, mins, L = _make_qkx2(sub, w, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(-1), _F32(0))
    max_min = np.maximum(mins.max(-1), _F32(0))
    inv_s = np.where(max_scale > 0, _F32(63) / np.where(max_scale > 0, max_scale, 1), _F32(0))
    inv_m = np.where(max_min > 0, _F32(63) / np.where(max_min > 0, max_min, 1), _F32(0))
    ls = np.minimum(_rint(inv_s[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(_rint(inv_m[:, None] * mins), 63).astype(np.uint8)
    d = (max_scale / _F32(63)).astype(np.float16)
    dmin = (max_min / _F32(63)).astype(np.float16)
    dj = d.astype(_F32)[:, None] * ls.astype(_F32)
    dm = dmin.astype(_F32)[:, None] * lm.astype(_F32)
    nz = dj != 0
    lq = np.clip(_rint((xb.reshape(nb, 8, 32) + dm[..., None])
                       / np.where(nz, dj, _F32(1))[..., None]), 0, 15)
    L = np.where(nz[..., None], lq, L).astype(np.uint8)
    sc = np.zeros((nb, 12), np.uint8)
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    pairs = L.reshape(nb, 4, 2, 32)  # 64 values per 32 bytes: low nibble, then high nibble
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, 128)
    out = np.concatenate([d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8),
                          sc, qs], axis=1)
    return out.reshape(n_rows, -1)


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1, no weights) over rows of ``x``: (scale, codes + nmax)."""
    idx = np.abs(x).argmax(-1)
    mx = np.take_along_axis(x, idx[:, None], -1)[:, 0]
    zero = np.abs(mx) < _EPS
    mxs = np.where(zero, _F32(1), mx)
    w = x * x

    def attempt(iscale):
        lq = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lq.astype(_F32)
        return lq, _sum(w * x * lf), _sum(w * lf * lf)

    L, sumlx, suml2 = attempt(-_F32(nmax) / mxs)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F32(1)), _F32(0))
    best = scale * sumlx
    for i in (*range(-9, 0), *range(1, 10)):
        lq, slx, sl2 = attempt(-(_F32(nmax) + _F32(0.1) * _F32(i)) / mxs)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better[:, None], lq, L)
        scale = np.where(better, slx / np.where(sl2 > 0, sl2, _F32(1)), scale)
        best = np.where(better, scale * slx, best)
    L = np.where(zero[:, None], -nmax, L) + nmax
    return np.where(zero, _F32(0), scale).astype(_F32), L


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Rows ``x`` (n, k) float32, k a multiple of 256 -> Q6_K bytes (n, k // 256 * 210)."""
    n_rows = np.asarray(x).shape[0]
    xb = _blocks(x)
    nb = xb.shape[0]
    scales, L = _make_qx(xb.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    ia = np.abs(scales).argmax(-1)
    max_scale = np.take_along_axis(scales, ia[:, None], -1)[:, 0]
    empty = np.abs(max_scale) < _EPS
    iscale = _F32(-128) / np.where(empty, _F32(1), max_scale)
    d = (_F32(1) / iscale).astype(np.float16)
    sc = np.clip(_rint(iscale[:, None] * scales), -128, 127).astype(np.int8)
    dj = d.astype(_F32)[:, None] * sc.astype(_F32)
    nz = dj != 0
    lq = np.clip(_rint(xb.reshape(nb, 16, 16) / np.where(nz, dj, _F32(1))[..., None]), -32, 31)
    L = np.where(nz[..., None], lq + 32, L).reshape(nb, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(nb, 1).view(np.uint8)], axis=1)
    out[empty] = 0
    return out.reshape(n_rows, -1)


# ---------------------------------------------------------------- exact encoders of QTensors

def fp16_exact(s: torch.Tensor) -> bool:
    return bool(torch.isfinite(s).all()) and bool((s.half().float() == s).all())


# type -> (bits, has a min m): value = d * (u - 2^(bits-1)) (Q4_0, Q5_0), d * u + m (Q4_1,
# Q5_1), d * q (Q8_0, int8 q)
LEGACY = {"Q4_0": (4, False), "Q4_1": (4, True), "Q5_0": (5, False), "Q5_1": (5, True),
          "Q8_0": (8, False)}


def _per32(q: QTensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The scales (and integer zero points) of ``q`` repeated to one per 32 values along a row:
    groups of a multiple of 32 along in_features, or one scale per output channel."""
    n, k = q.shape
    if k % 32 or q.quantizer != "midtread":
        return None
    if q.granularity == "group" and q.axis == 1 and q.group_size % 32 == 0:
        rep = q.group_size // 32
    elif q.granularity == "channel" and q.axis == 0:
        rep = k // 32
    else:
        return None
    z = q.zero_point
    if z is not None and z.is_floating_point():
        return None
    s = q.scale.float().reshape(n, -1).repeat_interleave(rep, dim=1)
    return s, None if z is None else z.to(torch.int32).reshape(n, -1).repeat_interleave(rep, 1)


def legacy_blocks(q: QTensor, qtype: str) -> tuple[np.ndarray, bool] | None:
    """The ``qtype`` blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: 32 values each) holding ``q``'s
    codes, or None when its format or grouping does not fit the type. Layouts (ggml-common.h):
    Q4_0 = fp16 d, 16 bytes of nibbles (value j low, value j + 16 high); Q4_1 = d, fp16 m,
    nibbles; Q5_0 = d, 32 high bits (uint32, bit j of value j), nibbles; Q5_1 = d, m, high
    bits, nibbles; Q8_0 = d, 32 int8. The second result says whether the scales (and mins) had
    to be rounded to fp16: False means the block values equal qkern's bit for bit."""
    bits, has_min = LEGACY[qtype]
    f = q.format
    got = _per32(q) if f.kind == "int" and f.bits == bits else None
    if got is None:
        return None
    s, z = got
    n, k = q.shape
    off = 2 ** (bits - 1)
    u = q.codes.to(torch.int32) + (off if f.signed else 0)
    zz = (torch.zeros_like(s, dtype=torch.int32) if z is None else z) + (off if f.signed else 0)
    if not bool(torch.isfinite(s).all()):
        return None
    if not has_min:  # value = d * (u - off): zero point off, or off - 1 with d = -s, u flipped
        flip = zz == off - 1
        if not bool(((zz == off) | flip).all()):
            return None
        u = torch.where(flip.repeat_interleave(32, dim=1), 2 * off - 1 - u, u)
        s = torch.where(flip, -s, s)
    d16 = s.half()
    rounded = not bool((d16.float() == s).all())
    head = [d16.numpy().reshape(n, -1, 1).view(np.uint8)]
    if has_min:
        m = -(d16.float() * zz.float())
        m16 = m.half()
        rounded = rounded or not bool((m16.float() == m).all())
        head.append(m16.numpy().reshape(n, -1, 1).view(np.uint8))
    un = u.numpy().reshape(n, k // 32, 32)
    if qtype == "Q8_0":
        body = [(un - off).astype(np.int8).view(np.uint8)]
    else:
        lo = (un & 0xF).astype(np.uint8)
        body = [lo[:, :, :16] | (lo[:, :, 16:] << 4)]
        if bits == 5:
            hi = ((un >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            body.insert(0, hi.sum(-1, dtype=np.uint32).reshape(n, -1, 1).view(np.uint8))
    return np.concatenate(head + body, axis=2).reshape(n, -1), rounded


def centered(q: QTensor, bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``q`` as signed codes c in [-2^(bits-1), 2^(bits-1)) times signed per-group scales (value
    = c * s): a symmetric int{bits} QTensor as it is, or a uint{bits} one whose integer zero
    points are 2^(bits-1) (c = u - z) or 2^(bits-1) - 1 (c = z - u, s negated, the code order
    flipped): what a GGUF import of ggml's negative scales gives. None otherwise."""
    f, off = q.format, 2 ** (bits - 1)
    if f.kind != "int" or f.bits != bits or q.granularity != "group" or q.axis != 1:
        return None
    n, k = q.shape
    s = q.scale.float().reshape(n, -1)
    if f.signed:
        return None if q.zero_point is not None else (q.codes.to(torch.int16), s)
    z = q.zero_point
    if z is None or z.is_floating_point():
        return None
    z = z.to(torch.int16).reshape(n, -1)
    if not bool(((z == off) | (z == off - 1)).all()):
        return None
    flip = (z == off - 1).repeat_interleave(q.group_size, dim=1)
    u = q.codes.to(torch.int16)
    c = torch.where(flip, 2 * off - 1 - u, u) - off
    return c, torch.where(z == off - 1, -s, s)


def q6_k_exact(q: QTensor) -> tuple[np.ndarray, bool] | None:
    """Q6_K blocks of an int6 QTensor (or uint6, zero points 32 / 31) in groups of 16 whose
    scales are ``d * sc`` (fp16 d per 256 values, int8 sc per 16): what a Q6_K import gives
    back; else None."""
    got = centered(q, 6) if q.group_size == 16 and q.shape[1] % QK_K == 0 else None
    if got is None:
        return None
    codes, st = got
    n, k = q.shape
    s = st.numpy().astype(np.float32).reshape(-1, 16)
    smax = np.take_along_axis(s, np.abs(s).argmax(-1)[:, None], -1)[:, 0]
    for m in (-128.0, 127.0):  # ggml gives the largest |scale| sc = -128
        d = (smax / np.float32(m)).astype(np.float16)
        df = np.where(d == 0, np.float32(1), d.astype(np.float32))[:, None]
        sc = np.rint(s / df)
        if np.all(np.abs(sc) <= 128) and np.all(sc <= 127) and np.all(sc * df == s):
            break
    else:
        return None
    c = (codes.numpy().astype(np.int16) + 32).reshape(-1, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([c[:, :, 0] & 0xF | (c[:, :, 2] & 0xF) << 4,
                         c[:, :, 1] & 0xF | (c[:, :, 3] & 0xF) << 4], axis=2)
    qh = ((c[:, :, 0] >> 4) | (c[:, :, 1] >> 4) << 2 | (c[:, :, 2] >> 4) << 4
          | (c[:, :, 3] >> 4) << 6)
    nb = s.shape[0]
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64),
                          sc.astype(np.int8).view(np.uint8), d.reshape(nb, 1).view(np.uint8)],
                         axis=1)
    return out.reshape(n, -1), False
