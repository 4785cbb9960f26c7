"""Independent numpy references for qkern, written from docs/numerics.md and the published
NF4 table (QLoRA's NormalFloat4 as bitsandbytes ships it).

Nothing here imports qkern. Arithmetic follows the spec: float32 divisions/subtractions where
the spec says float32, rounding decisions in float64 (exact for float32 inputs).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

F32 = np.float32
FLT_MIN = np.finfo(np.float32).tiny
ROUNDINGS = ("nearest_even", "half_away", "half_up", "floor", "ceil", "trunc", "stochastic",
             "away")

# ---------------------------------------------------------------------------------------------
# Published tables
# ---------------------------------------------------------------------------------------------
NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
E2M1_MAG = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
BNB_FP4_MAG = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=np.float32) / F32(12))


def _sign_magnitude(mag: np.ndarray, sign_bit: int) -> np.ndarray:
    return np.concatenate([mag, -mag]).astype(np.float32)  # code | sign_bit -> -value


def fp8_value(code: int, ebits: int, mbits: int, bias: int, fn: bool) -> float:
    """Decodes one fp8 code from its bit fields (fn: E4M3 'finite', only S.1111.111 is NaN)."""
    s = -1.0 if code >> 7 else 1.0
    e = (code >> mbits) & ((1 << ebits) - 1)
    m = code & ((1 << mbits) - 1)
    emax_field = (1 << ebits) - 1
    if fn and e == emax_field and m == (1 << mbits) - 1:
        return math.nan
    if not fn and e == emax_field:
        return math.nan  # Inf and NaN codes: .values marks both as NaN
    if e == 0:
        return s * m / (1 << mbits) * 2.0 ** (1 - bias)
    return s * (1 + m / (1 << mbits)) * 2.0 ** (e - bias)


def log2_values(bits: int) -> np.ndarray:
    k_max = 2 ** (bits - 1) - 1
    mag = np.array([0.0] + [2.0 ** (k - k_max) for k in range(1, k_max + 1)], dtype=np.float32)
    return _sign_magnitude(mag, 2 ** (bits - 1))


def g711_values(law: str) -> np.ndarray:
    dec = audioop.ulaw2lin if law == "mulaw" else audioop.alaw2lin
    return np.frombuffer(dec(bytes(range(256)), 2), dtype="<i2").astype(np.float32)


def format_values(name: str) -> np.ndarray:
    """value[code] for every code of a codebook format (NaN for NaN/Inf codes)."""
    if name == "nf4":
        return NF4.copy()
    if name in ("fp4_e2m1", "mxfp4"):
        return _sign_magnitude(E2M1_MAG, 8)
    if name == "fp4_bnb":
        return _sign_magnitude(BNB_FP4_MAG, 8)
    if name in ("fp8_e4m3", "mxfp8_e4m3"):
        return np.array([fp8_value(c, 4, 3, 7, True) for c in range(256)], dtype=np.float32)
    if name == "fp8_e5m2":
        return np.array([fp8_value(c, 5, 2, 15, False) for c in range(256)], dtype=np.float32)
    if name.startswith("log2_"):
        return log2_values(int(name.split("_")[1]))
    if name in ("mulaw", "alaw"):
        return g711_values(name)
    if name == "binary":
        return np.array([1.0, -1.0], dtype=np.float32)
    raise KeyError(name)


SIGN_BIT = {"fp4_e2m1": 8, "mxfp4": 8, "fp4_bnb": 8, "fp8_e4m3": 0x80, "mxfp8_e4m3": 0x80,
            "fp8_e5m2": 0x80, **{f"log2_{b}": 2 ** (b - 1) for b in range(2, 9)}}
MAX_VALUE = {"nf4": 1.0, "fp4_e2m1": 6.0, "mxfp4": 6.0, "fp4_bnb": 1.0, "fp8_e4m3": 448.0,
             "mxfp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "mulaw": 32124.0, "alaw": 32256.0,
             "binary": 1.0, **{f"log2_{b}": 1.0 for b in range(2, 9)}}
MX_EMAX = {"mxfp4": 2, "mxfp8_e4m3": 8, "mxint8": 6}
BLOCK = {"nf4": 64, "fp4_e2m1": 64, "fp4_bnb": 64, "mxfp4": 32, "mxfp8_e4m3": 32, "mxint8": 32}


def int_range(name: str) -> tuple[int, int]:
    if name == "ternary":
        return -1, 1
    if name == "mxint8":
        return -128, 127
    bits = int(name.lstrip("uint"))
    if name.startswith("uint"):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def magnitude_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(ascending non-negative magnitudes, their codes) of a sign-magnitude format."""
    vals = format_values(name)
    sb = SIGN_BIT[name]
    codes = np.arange(sb)
    mag = vals[:sb]
    ok = ~np.isnan(mag)
    order = np.argsort(mag[ok], kind="stable")
    return mag[ok][order], codes[ok][order]


def signed_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    vals = format_values(name)
    order = np.argsort(vals, kind="stable")
    return vals[order], np.arange(len(vals))[order]


# ---------------------------------------------------------------------------------------------
# Counter RNG and rounding
# ---------------------------------------------------------------------------------------------
def rng_uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """u in [0, 1) (float32) for each flat kernel index (splitmix64 finalizer)."""
    i = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + np.uint64(0x9E3779B97F4A7C15) * (i + np.uint64(1))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) * F32(2.0**-24)


def rng_uniform_pyint(seed: int, i: int) -> float:
    """Scalar big-int version, to check the vectorized one."""
    m = 2**64
    z = (seed + 0x9E3779B97F4A7C15 * (i + 1)) % m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
    z ^= z >> 31
    return (z >> 40) / 2**24


def rnd(v: np.ndarray, mode: str, u: np.ndarray | None = None) -> np.ndarray:
    """Integer-valued float64 result of rounding float32 v."""
    v = np.asarray(v, dtype=np.float32).astype(np.float64)
    if mode == "nearest_even":
        return np.rint(v)
    if mode == "half_away":
        return np.copysign(np.floor(np.abs(v) + 0.5), v)
    if mode == "half_up":
        return np.floor(v + 0.5)
    if mode == "floor":
        return np.floor(v)
    if mode == "ceil":
        return np.ceil(v)
    if mode == "trunc":
        return np.trunc(v)
    if mode == "away":  # directed away from zero
        return np.where(v >= 0, np.ceil(v), np.floor(v))
    if mode == "stochastic":
        f = np.floor(v)
        return f + (np.asarray(u, dtype=np.float64) < (v - f))
    raise ValueError(mode)


# ---------------------------------------------------------------------------------------------
# Granularity: user tensor <-> kernel view (rows, cols) with groups along rows
# ---------------------------------------------------------------------------------------------
class View:
    def __init__(self, shape, granularity="tensor", axis=None, group_size=None):
        self.shape = tuple(shape)
        self.gran = granularity
        nd = len(self.shape)
        numel = int(np.prod(self.shape, dtype=np.int64))
        if granularity == "tensor":
            self.axis, self.rows, self.cols, self.group = None, 1, numel, numel
        elif granularity == "channel":
            self.axis = (0 if axis is None else axis) % nd
            self.rows = self.shape[self.axis]
            self.cols = self.group = numel // max(self.rows, 1)
        else:
            self.axis = (-1 if axis is None else axis) % nd
            self.cols = self.shape[self.axis]
            self.rows = numel // max(self.cols, 1)
            self.group = group_size

    def to2d(self, x: np.ndarray) -> np.ndarray:
        if self.gran == "channel":
            x = np.moveaxis(x, self.axis, 0)
        elif self.gran == "group":
            x = np.moveaxis(x, self.axis, -1)
        return np.ascontiguousarray(x).reshape(self.rows, self.cols)

    def from2d(self, y: np.ndarray) -> np.ndarray:
        if self.gran == "tensor":
            return y.reshape(self.shape)
        if self.gran == "channel":
            moved = (self.shape[self.axis],) + tuple(np.delete(self.shape, self.axis))
            return np.moveaxis(y.reshape(moved), 0, self.axis)
        moved = tuple(np.delete(self.shape, self.axis)) + (self.shape[self.axis],)
        return np.moveaxis(y.reshape(moved), -1, self.axis)

    def scale_shape_nd(self, s2d: np.ndarray) -> np.ndarray:
        """Per-group parameters (rows, cols//group) in the user layout of the spec."""
        if self.gran == "tensor":
            return s2d.reshape(())
        if self.gran == "channel":
            return s2d.reshape(self.rows)
        moved = tuple(np.delete(self.shape, self.axis)) + (self.cols // self.group,)
        return np.moveaxis(s2d.reshape(moved), -1, self.axis)

    def scale_to2d(self, p) -> np.ndarray:
        """Inverse of scale_shape_nd (a scalar is accepted for one group)."""
        p = np.asarray(p)
        if self.gran == "group" and p.ndim:
            p = np.moveaxis(p, self.axis, -1)
        return np.ascontiguousarray(p).reshape(self.rows, self.cols // self.group)

    def expand(self, p2d: np.ndarray) -> np.ndarray:
        return np.repeat(p2d, self.group, axis=1)

    def groups(self, x2d: np.ndarray) -> np.ndarray:
        return x2d.reshape(self.rows, self.cols // self.group, self.group)

    def index(self) -> np.ndarray:
        return np.arange(self.rows * self.cols, dtype=np.uint64).reshape(self.rows, self.cols)


def sanitize_scale(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float32).copy()
    s[~(s > 0)] = 1.0
    s[s < FLT_MIN] = FLT_MIN
    return s


def mean_abs_scale(xg: np.ndarray) -> np.ndarray:
    """mean|x| per group: float64 sum in index order (docs/numerics.md), then float32."""
    total = np.add.accumulate(np.abs(xg).astype(np.float64), axis=-1)[..., -1]
    return sanitize_scale((total / xg.shape[-1]).astype(F32))


def mx_scale(amax: np.ndarray, emax: int) -> np.ndarray:
    amax = np.asarray(amax, dtype=np.float32)
    _, e = np.frexp(np.where(amax > 0, amax, F32(1)))
    e = np.clip(e.astype(np.int64) - 1 - emax, -127, 127)
    out = np.ldexp(F32(1), e).astype(np.float32)
    return np.where(amax > 0, out, np.ldexp(F32(1), -127)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Affine (integer) quantization
# ---------------------------------------------------------------------------------------------
def affine_params(xg: np.ndarray, qmin: int, qmax: int, symmetric: bool, quantizer: str):
    """Scale and zero point per group; xg is (rows, groups, group)."""
    if symmetric:
        amax = np.abs(xg).max(axis=-1) if xg.shape[-1] else np.zeros(xg.shape[:-1], F32)
        qpos = qmax + 0.5 if quantizer == "midrise" else float(qmax)
        scale = sanitize_scale(amax.astype(F32) / F32(qpos))
        return scale, np.zeros(scale.shape, np.int32)
    lo = np.minimum(xg.min(axis=-1), F32(0)).astype(F32)
    hi = np.maximum(xg.max(axis=-1), F32(0)).astype(F32)
    scale = sanitize_scale((hi - lo) / F32(qmax - qmin))
    zp = np.clip(qmin - np.rint((lo / scale).astype(F32).astype(np.float64)), qmin, qmax)
    return scale, zp.astype(np.int32)


def affine_quantize_2d(x2d, scale_full, zp_full, qmin, qmax, rounding="nearest_even",
                       quantizer="midtread", deadzone=1.0, seed=0, index=None):
    """Codes (int64) from the kernel view; scale_full/zp_full are per-element."""
    with np.errstate(over="ignore", invalid="ignore"):  # huge t saturates (spec)
        t = (x2d.astype(F32) * (F32(1) / scale_full.astype(F32))).astype(F32)
    u = rng_uniform(seed, index) if rounding == "stochastic" else None
    if quantizer == "midrise":
        q = rnd((t - F32(0.5)).astype(F32), rounding, u)
    elif quantizer == "deadzone":
        h = (F32(deadzone) - F32(1)) * F32(0.5)
        a = (np.abs(t) - h).astype(F32)
        q = np.maximum(rnd(a, rounding, u), 0.0)
        q = np.where(t < 0, -q, q)
    else:
        q = rnd(t, rounding, u)
    return np.clip(q + zp_full, qmin, qmax).astype(np.int64)


def affine_dequantize(codes, scale_full, zp_full, quantizer="midtread") -> np.ndarray:
    c = (np.asarray(codes, np.int64) - np.asarray(zp_full, np.int64)).astype(F32)
    if quantizer == "midrise":
        c = (c + F32(0.5)).astype(F32)
    return (c * np.asarray(scale_full, F32)).astype(F32)


def quantize_int(x, name, *, granularity="tensor", axis=None, group_size=None, symmetric=True,
                 rounding="nearest_even", quantizer="midtread", deadzone=1.0, seed=0,
                 scale=None, zero_point=None, clip=None):
    """Full reference for integer formats. Returns (codes, scale, zp, dequant) in user layout."""
    x = np.asarray(x, dtype=np.float32)
    if clip is not None:
        x = np.clip(x, F32(clip[0]), F32(clip[1])).astype(F32)
    qmin, qmax = int_range(name)
    v = View(x.shape, granularity, axis, group_size)
    x2d = v.to2d(x)
    if name == "mxint8" and scale is None:
        sc = mx_scale(np.abs(v.groups(x2d)).max(axis=-1), MX_EMAX["mxint8"])
        zp = np.zeros(sc.shape, np.int32)
    elif name == "ternary" and scale is None:  # BitNet b1.58 absmean scale
        sc = mean_abs_scale(v.groups(x2d))
        zp = np.zeros(sc.shape, np.int32)
    elif scale is None:
        sc, zp = affine_params(v.groups(x2d), qmin, qmax, symmetric, quantizer)
    else:
        sc = v.scale_to2d(np.asarray(scale, F32))
        zp = np.zeros(sc.shape, np.int32) if zero_point is None else v.scale_to2d(
            np.asarray(zero_point, np.int32))
    codes = affine_quantize_2d(x2d, v.expand(sc), v.expand(zp), qmin, qmax, rounding, quantizer,
                               deadzone, seed, v.index())
    deq = affine_dequantize(codes, v.expand(sc), v.expand(zp), quantizer)
    return v.from2d(codes), v.scale_shape_nd(sc), v.scale_shape_nd(zp), v.from2d(deq)


# ---------------------------------------------------------------------------------------------
# Codebook quantization
# ---------------------------------------------------------------------------------------------
def _bracket(table, tcodes, t, mode, up_is_hi, sign_mag, u):
    """Index into `table` for each t (table ascending). up_is_hi: bool array."""
    n = len(table)
    i = np.searchsorted(table, t, side="right") - 1
    ic = np.clip(i, 0, n - 2)
    lo, hi = table[ic], table[ic + 1]
    dlo = (t - lo).astype(F32)
    dhi = (hi - t).astype(F32)
    even_lo = (tcodes[ic] & 1) == 0
    lo_bigger = np.abs(lo) > np.abs(hi)
    if mode == "nearest_even":
        pick_hi = np.where(dlo == dhi, ~even_lo, dhi < dlo)
    elif mode in ("half_away", "half_up"):
        tie_hi = (~lo_bigger if not sign_mag else np.ones_like(even_lo)) \
            if mode == "half_away" else up_is_hi
        pick_hi = np.where(dlo == dhi, tie_hi, dhi < dlo)
    elif mode == "floor":
        pick_hi = ~up_is_hi
    elif mode == "ceil":
        pick_hi = up_is_hi
    elif mode == "trunc":
        pick_hi = lo_bigger if not sign_mag else np.zeros_like(even_lo)
    elif mode == "away":  # larger magnitude; equal magnitudes: the one on t's side of zero
        same = np.abs(lo) == np.abs(hi)
        pick_hi = np.where(same, t >= 0, ~lo_bigger) if not sign_mag else np.ones_like(even_lo)
    elif mode == "stochastic":
        p = ((t - lo).astype(F32) / (hi - lo).astype(F32)).astype(F32)
        pick_hi = u < p
    else:
        raise ValueError(mode)
    idx = ic + pick_hi.astype(np.int64)
    idx = np.where(table[ic] == t, ic, idx)  # exact table values map to themselves
    idx = np.where(table[ic + 1] == t, ic + 1, idx)
    idx = np.where(i < 0, 0, idx)
    return np.where(i >= n - 1, n - 1, idx)


def codebook_codes(t: np.ndarray, name: str, rounding="nearest_even", u=None) -> np.ndarray:
    """Codes for t = x * (1 / scale) (float32) of a codebook format (not G.711)."""
    t = np.asarray(t, dtype=np.float32)
    if u is None:
        u = np.zeros(t.shape, F32)
    if name in SIGN_BIT:
        table, tcodes = magnitude_table(name)
        neg = np.signbit(t)
        idx = _bracket(table, tcodes, np.abs(t), rounding, ~neg, True, u)
        return tcodes[idx] | np.where(neg, SIGN_BIT[name], 0)
    table, tcodes = signed_table(name)
    idx = _bracket(table, tcodes, t, rounding, np.ones(t.shape, bool), False, u)
    return tcodes[idx]


def g711_quantize(t: np.ndarray, law: str, rounding="nearest_even", u=None) -> np.ndarray:
    pcm = np.clip(rnd(t, rounding, u), -32768, 32767).astype("<i2")
    enc = audioop.lin2ulaw if law == "mulaw" else audioop.lin2alaw
    return np.frombuffer(enc(pcm.tobytes(), 2), dtype=np.uint8).reshape(t.shape)


def quantize_codebook(x, name, *, granularity=None, axis=None, group_size=None,
                      rounding="nearest_even", seed=0, scale=None, clip=None):
    """Reference for codebook / MX-float / G.711 formats: (codes, scale, dequant)."""
    x = np.asarray(x, dtype=np.float32)
    if clip is not None:
        x = np.clip(x, F32(clip[0]), F32(clip[1])).astype(F32)
    if granularity is None:
        granularity = "group" if name in BLOCK else "tensor"
        group_size = group_size or BLOCK.get(name)
    v = View(x.shape, granularity, axis, group_size)
    x2d = v.to2d(x)
    xg = v.groups(x2d)
    if scale is not None:
        sc = v.scale_to2d(np.asarray(scale, F32))
    elif name in MX_EMAX:
        sc = mx_scale(np.abs(xg).max(axis=-1), MX_EMAX[name])
    elif name == "binary":
        sc = mean_abs_scale(xg)
    else:
        sc = sanitize_scale(np.abs(xg).max(axis=-1).astype(F32) / F32(MAX_VALUE[name]))
    with np.errstate(over="ignore", invalid="ignore"):
        t = (x2d * (F32(1) / v.expand(sc))).astype(F32)
    u = rng_uniform(seed, v.index()) if rounding == "stochastic" else None
    if name in ("mulaw", "alaw"):
        codes = g711_quantize(t, name, rounding, u).astype(np.int64)
    else:
        codes = codebook_codes(t, name, rounding, u).astype(np.int64)
    deq = (format_values(name)[codes] * v.expand(sc)).astype(F32)
    return v.from2d(codes), v.scale_shape_nd(sc), v.from2d(deq)


def double_quant_scales(s: np.ndarray, group: int = 256) -> np.ndarray:
    """Dequantized nf4/fp4 block scales after double quantization (flat, in block order)."""
    s = np.asarray(s, np.float32).reshape(-1)
    m = F32(np.mean(s.astype(np.float64)))
    d = (s - m).astype(F32)
    out = np.empty_like(d)
    for g0 in range(0, len(d), group):
        dg = d[g0:g0 + group]
        s2 = sanitize_scale(np.array([np.abs(dg).max() / F32(127)], F32))[0]
        c = np.clip(np.rint((dg / s2).astype(F32).astype(np.float64)), -128, 127).astype(F32)
        out[g0:g0 + group] = (c * s2).astype(F32) + m
    return out.astype(F32)


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------
def bit_stream(codes, bits: int, order: str = "lsb") -> np.ndarray:
    """0/1 stream: element i in stream bits [i*bits, (i+1)*bits)."""
    c = np.asarray(codes).reshape(-1).astype(np.int64) & ((1 << bits) - 1)
    shifts = np.arange(bits) if order == "lsb" else np.arange(bits)[::-1]
    return ((c[:, None] >> shifts[None, :]) & 1).astype(np.uint8).reshape(-1)


def pack_bits(codes, bits: int, order: str = "lsb") -> np.ndarray:
    stream = bit_stream(codes, bits, order)
    return np.packbits(stream, bitorder="little" if order == "lsb" else "big")


def unpack_bits(packed, bits: int, n: int, order: str = "lsb") -> np.ndarray:
    stream = np.unpackbits(np.asarray(packed, np.uint8),
                           bitorder="little" if order == "lsb" else "big")[: n * bits]
    w = (1 << np.arange(bits)) if order == "lsb" else (1 << np.arange(bits)[::-1])
    return (stream.reshape(n, bits).astype(np.int64) * w).sum(axis=1).astype(np.uint8)


def pack_int32(codes, bits: int, dim: int) -> np.ndarray:
    c = np.moveaxis(np.asarray(codes), dim, -1)
    n = c.shape[-1]
    words = -(-n * bits // 32)
    lines = c.reshape(int(np.prod(c.shape[:-1], dtype=np.int64)), n)
    out = np.zeros((lines.shape[0], words), dtype=np.int32)
    for r, line in enumerate(lines):
        stream = bit_stream(line, bits, "lsb")
        stream = np.concatenate([stream, np.zeros(words * 32 - len(stream), np.uint8)])
        by = np.packbits(stream, bitorder="little")
        out[r] = by.view("<u4").astype(np.int64).astype(np.uint32).view(np.int32)
    return np.moveaxis(out.reshape(c.shape[:-1] + (words,)), -1, dim)
