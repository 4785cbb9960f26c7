"""The format registry: every number format qkern can quantize to, by name.

A format is either an integer grid (``kind="int"``: codes ``qmin..qmax``, value
``(code - zero_point) * scale``), a codebook (``kind="codebook"``: a table ``values[code]``,
value ``values[code] * scale``) or a companded audio format (``kind="companded"``). Exact
definitions: docs/numerics.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import _C

__all__ = ["Format", "get", "names"]

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BNB_FP4_MAGNITUDES = tuple(v / 12 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0))

# the scale rule ids of csrc/core/affine.h, exported by qkern._C
SCALE_ABSMAX, SCALE_MINMAX, SCALE_POW2_MX, SCALE_MEANABS = (
    _C.SCALE_RULES[k] for k in ("absmax", "minmax", "pow2_mx", "meanabs"))


@dataclass(frozen=True, eq=False)
class Format:
    """A number format. ``values`` maps every code to its value (NaN for NaN/Inf codes)."""

    name: str
    bits: int
    signed: bool
    kind: str  # "int" | "codebook" | "companded"
    max_value: float
    qmin: int = 0
    qmax: int = 0
    table: np.ndarray | None = field(default=None, repr=False)  # value of each code
    sign_bit: int = 0  # codebook: the sign bit of sign-magnitude codes (0 = plain table)
    block_size: int | None = None  # default group size of block formats
    scale_rule: int = SCALE_ABSMAX
    emax: int = 0  # MX: exponent of the element format's largest value
    scale_bits: int = 32  # storage of one scale
    symmetric_only: bool = False
    description: str = ""

    @property
    def values(self) -> torch.Tensor | None:
        """Value of every code (float32; NaN for NaN/Inf codes), None for integer formats."""
        return None if self.table is None else torch.from_numpy(self.table.copy())

    @property
    def codebook(self) -> torch.Tensor | None:
        """Every representable value, ascending (None for plain integer formats)."""
        if self.table is None:
            return None
        v = self.table[np.isfinite(self.table)]
        return torch.from_numpy(np.unique(v.astype(np.float32)))

    @property
    def search_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(ascending values, their codes) as the kernels search them: magnitudes only for
        sign-magnitude formats."""
        codes = np.arange(len(self.table), dtype=np.int64)
        v = self.table
        keep = np.isfinite(v)
        if self.sign_bit:
            keep &= (codes & self.sign_bit) == 0
        codes, v = codes[keep], v[keep].astype(np.float32)
        order = np.argsort(v, kind="stable")
        return v[order], codes[order].astype(np.uint8)

    @property
    def lut(self) -> np.ndarray:
        """256-entry float32 decode table (zero past the format's codes and for NaN codes)."""
        out = np.zeros(256, dtype=np.float32)
        v = np.nan_to_num(self.table.astype(np.float32), nan=0.0)
        out[: len(v)] = v
        return out

    def __repr__(self) -> str:
        return f"Format({self.name!r}, bits={self.bits}, kind={self.kind!r})"


def _sign_magnitude(mags: np.ndarray, sign_bit: int) -> np.ndarray:
    mags = np.asarray(mags, dtype=np.float64)
    return np.concatenate([mags, -mags])[: 2 * sign_bit].astype(np.float32)


def _minifloat(ebits: int, mbits: int, bias: int, ieee_specials: bool) -> np.ndarray:
    """All 2^(1+e+m) codes of a minifloat; e4m3fn-style (only S.1111.111 is NaN) when
    ieee_specials is False, IEEE-style (top exponent is Inf/NaN) when True."""
    n_mag = 1 << (ebits + mbits)
    mags = np.empty(n_mag, dtype=np.float64)
    for c in range(n_mag):
        e, m = c >> mbits, c & ((1 << mbits) - 1)
        if e == 0:
            mags[c] = m / (1 << mbits) * 2.0 ** (1 - bias)
        else:
            mags[c] = (1 + m / (1 << mbits)) * 2.0 ** (e - bias)
    if ieee_specials:
        mags[(((1 << ebits) - 1) << mbits):] = np.nan
    else:
        mags[-1] = np.nan
    return _sign_magnitude(mags, n_mag)


def _g711_values(law: str) -> np.ndarray:
    # the decode table comes from the bit-exact G.711 decoder
    codes = np.arange(256, dtype=np.uint8)
    dec = _C.mulaw_decode(codes) if law == "mulaw" else _C.alaw_decode(codes)
    return np.asarray(dec, dtype=np.float32)


def _build() -> dict[str, Format]:
    reg: dict[str, Format] = {}

    def add(f: Format) -> None:
        reg[f.name] = f

    for b in range(1, 9):
        add(Format(f"int{b}", b, True, "int", float(2 ** (b - 1) - 1) if b > 1 else 0.0,
                   qmin=-(2 ** (b - 1)), qmax=2 ** (b - 1) - 1,
                   description=f"{b}-bit two's complement integer"))
        add(Format(f"uint{b}", b, False, "int", float(2**b - 1), qmin=0, qmax=2**b - 1,
                   description=f"{b}-bit unsigned integer"))
    add(Format("ternary", 2, True, "int", 1.0, qmin=-1, qmax=1, symmetric_only=True,
               scale_rule=SCALE_MEANABS, description="{-1, 0, +1} (1.58-bit), absmean scale"))
    add(Format("binary", 1, True, "codebook", 1.0, table=np.array([1.0, -1.0], np.float32),
               scale_rule=SCALE_MEANABS, description="{+1, -1}, XNOR-Net alpha = mean|x|"))
    add(Format("nf4", 4, True, "codebook", 1.0, table=np.array(NF4_VALUES, np.float32),
               block_size=64, description="NormalFloat4 (QLoRA / bitsandbytes)"))
    e2m1 = _sign_magnitude(np.array(E2M1_MAGNITUDES), 8)
    add(Format("fp4_e2m1", 4, True, "codebook", 6.0, table=e2m1, sign_bit=8, block_size=64,
               description="FP4 E2M1 (OCP MX element)"))
    add(Format("fp4_bnb", 4, True, "codebook", 1.0,
               table=_sign_magnitude(np.array(BNB_FP4_MAGNITUDES), 8), sign_bit=8,
               block_size=64, description="bitsandbytes' FP4 table"))
    e4m3 = _minifloat(4, 3, 7, ieee_specials=False)
    e5m2 = _minifloat(5, 2, 15, ieee_specials=True)
    add(Format("fp8_e4m3", 8, True, "codebook", 448.0, table=e4m3, sign_bit=0x80,
               description="FP8 E4M3 (fn: no Inf, saturating)"))
    add(Format("fp8_e5m2", 8, True, "codebook", 57344.0, table=e5m2, sign_bit=0x80,
               description="FP8 E5M2 (saturating)"))
    add(Format("mxfp4", 4, True, "codebook", 6.0, table=e2m1, sign_bit=8, block_size=32,
               scale_rule=SCALE_POW2_MX, emax=2, scale_bits=8,
               description="OCP MXFP4: E2M1 elements, E8M0 scale per 32"))
    add(Format("mxfp8_e4m3", 8, True, "codebook", 448.0, table=e4m3, sign_bit=0x80,
               block_size=32, scale_rule=SCALE_POW2_MX, emax=8, scale_bits=8,
               description="OCP MXFP8 E4M3: E8M0 scale per 32"))
    add(Format("mxint8", 8, True, "int", 127.0, qmin=-128, qmax=127, block_size=32,
               scale_rule=SCALE_POW2_MX, emax=6, scale_bits=8, symmetric_only=True,
               description="OCP MXINT8: int8 elements x 2^-6, E8M0 scale per 32"))
    for b in range(2, 9):
        k = 2 ** (b - 1) - 1
        mags = np.array([0.0] + [2.0 ** (i - k) for i in range(1, k + 1)])
        add(Format(f"log2_{b}", b, True, "codebook", 1.0,
                   table=_sign_magnitude(mags, 2 ** (b - 1)), sign_bit=2 ** (b - 1),
                   description=f"sign + {b - 1}-bit power-of-two exponent + zero"))
    for law, mx in (("mulaw", 32124.0), ("alaw", 32256.0)):
        add(Format(law, 8, True, "companded", mx, table=_g711_values(law),
                   description=f"ITU-T G.711 {law} over 16-bit PCM"))
    return reg


_REGISTRY = _build()


def names() -> list[str]:
    """Names of every format, in registry order."""
    return list(_REGISTRY)


def get(name: str | Format) -> Format:
    """The Format called ``name`` (a Format is returned as is)."""
    if isinstance(name, Format):
        return name
    if not isinstance(name, str):
        raise TypeError(f"format must be a name (str) or a Format, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown format {name!r}; known formats: {', '.join(_REGISTRY)}"
        ) from None
