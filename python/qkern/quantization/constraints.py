"""Hardware constraints any quantizer config can carry (``BaseConfig.constraints``).

A :class:`HardwareConstraints` says what the target integer hardware can do:

- ``pow2_scales``: every scale is a power of two (a shift instead of a multiply). A scale
  ``s`` becomes ``2^ceil(log2 s)`` (rounded *up*: the range only grows, so no value that was
  inside the grid is clipped; the step is at most 2x coarser);
- ``per_tensor``: one weight scale per layer (activations are per tensor already);
- ``symmetric``: no zero points (weights and activations);
- ``accumulator_bits`` P with ``input_bits`` N / ``input_signed``: the integer weights of
  every output channel satisfy the A2Q bound (Colbert et al., 2023)
  ``||w_int||_1 <= (2^(P-1) - 1) // max|x_int|``, so ``sum_i w_i x_i`` cannot overflow a
  signed P-bit accumulator for any N-bit input (a zero point of the input is folded into the
  bias, which is added in a wider register). The weights are rounded to nearest first; a
  channel over the budget is then (``accumulator_method="scale"``, the default, per-channel
  scales only) re-quantized with a coarser scale ``s * l1 / budget`` (repeated, power of two
  when asked, until it fits or 20 rounds), and what is still over is shrunk by an integer soft
  threshold ``q_i <- sign(q_i) max(|q_i| - t, 0)`` with the smallest integer ``t`` that meets
  the budget (the l1-ball projection of A2Q, post-training, restricted to integer thresholds;
  ``accumulator_method="l1_project"`` uses only this).

Example::

    >>> from qkern.quantization.constraints import HardwareConstraints
    >>> c = HardwareConstraints(accumulator_bits=16, input_bits=8)
    >>> c.l1_budget()
    255
    >>> HardwareConstraints.coerce({"pow2_scales": True}).pow2_scales
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .. import formats as QF
from ..quantize import quantize

__all__ = ["HardwareConstraints", "accumulator_bits_needed", "check_dynamic_activations",
           "check_input_format", "constrain_activation", "constrained_fake_weight",
           "constrained_weight", "fit_l1_budget", "grid_params", "l1_project_int", "pow2_ceil",
           "symmetric_weights", "whole_layer", "worst_case_accumulator"]


@dataclass(frozen=True)
class HardwareConstraints:
    """What the integer hardware supports; see the module docstring for each field.

    >>> HardwareConstraints(pow2_scales=True, symmetric=True).to_dict()["symmetric"]
    True
    """

    pow2_scales: bool = False
    per_tensor: bool = False
    symmetric: bool = False
    accumulator_bits: int | None = None
    input_bits: int = 8
    input_signed: bool = True
    #: how a channel over the l1 budget is brought under it: "scale" (a coarser scale for that
    #: channel, then the soft threshold for what rounding leaves over) or "l1_project" (the
    #: integer soft threshold only; the only choice with per_tensor)
    accumulator_method: str = "scale"

    def __post_init__(self) -> None:
        if self.accumulator_method not in ("scale", "l1_project"):
            raise ValueError("HardwareConstraints.accumulator_method must be 'scale' or "
                             f"'l1_project', got {self.accumulator_method!r}")
        for f in ("pow2_scales", "per_tensor", "symmetric", "input_signed"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"HardwareConstraints.{f} must be a bool, "
                                 f"got {getattr(self, f)!r}")
        p = self.accumulator_bits
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or not 2 <= p <= 64):
            raise ValueError(f"HardwareConstraints.accumulator_bits must be None or an int in "
                             f"[2, 64], got {p!r}")
        n = self.input_bits
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
            raise ValueError(f"HardwareConstraints.input_bits must be an int in [1, 16], "
                             f"got {n!r}")
        if p is not None and self.l1_budget() < 1:
            raise ValueError(
                f"HardwareConstraints: a {p}-bit accumulator cannot hold even one product of a "
                f"{n}-bit {'signed' if self.input_signed else 'unsigned'} input "
                f"(max |x| = {self.max_abs_input()}) and a weight of 1; use more "
                "accumulator_bits or fewer input_bits")

    @staticmethod
    def coerce(v) -> HardwareConstraints | None:
        """None, a HardwareConstraints, or its dict (from JSON) -> HardwareConstraints."""
        if v is None or isinstance(v, HardwareConstraints):
            return v
        if isinstance(v, dict):
            names = {f.name for f in dataclasses.fields(HardwareConstraints)}
            bad = set(v) - names
            if bad:
                raise ValueError(f"HardwareConstraints: unknown field(s) {sorted(bad)}; "
                                 f"fields: {sorted(names)}")
            return HardwareConstraints(**v)
        raise ValueError(f"constraints must be None, a HardwareConstraints or a dict of its "
                         f"fields, got {type(v).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def input_range(self) -> tuple[int, int]:
        """(lo, hi) of the integer inputs."""
        n = self.input_bits
        return (-(2 ** (n - 1)), 2 ** (n - 1) - 1) if self.input_signed else (0, 2**n - 1)

    def max_abs_input(self) -> int:
        lo, hi = self.input_range()
        return max(-lo, hi)

    def l1_budget(self) -> int | None:
        """The largest allowed ``||w_int||_1`` per output channel (None: no bound)."""
        if self.accumulator_bits is None:
            return None
        return (2 ** (self.accumulator_bits - 1) - 1) // self.max_abs_input()

    def touches_weights(self) -> bool:
        return (self.pow2_scales or self.per_tensor or self.symmetric
                or self.accumulator_bits is not None)


def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2 s)`` element-wise (float32); a scale <= 0 becomes 1."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    out = torch.exp2(torch.ceil(torch.log2(s.clamp_min(torch.finfo(torch.float32).tiny))))
    return torch.where(s > 0, out, torch.ones_like(s))


def l1_project_int(q: torch.Tensor, budget: int) -> torch.Tensor:
    """Integer soft threshold of each row of ``q`` (int64, (rows, K)) with the smallest
    integer threshold that brings the row's l1 norm to ``<= budget``."""
    q = q.to(torch.int64)
    mag = q.abs()
    out = q.clone()
    for r in torch.nonzero(mag.sum(1) > budget).flatten().tolist():
        m = mag[r]
        lo, hi = 0, int(m.max())  # hi always meets the budget (every weight zero)
        while lo < hi:
            t = (lo + hi) // 2
            if int((m - t).clamp_min(0).sum()) <= budget:
                hi = t
            else:
                lo = t + 1
        out[r] = torch.sign(q[r]) * (m - lo).clamp_min(0)
    return out


def worst_case_accumulator(q, lo: int, hi: int) -> np.ndarray:
    """Exact ``max |sum_i q_i x_i|`` over integer inputs ``lo <= x_i <= hi`` for each row of
    ``q`` (int64): the sign-aligned input (x_i = hi where q_i > 0, lo where q_i < 0) reaches
    the maximum, the opposite one the minimum."""
    q = np.asarray(q.cpu() if isinstance(q, torch.Tensor) else q, dtype=np.int64)
    q = q.reshape(q.shape[0], -1)
    pos = np.where(q > 0, q, 0).sum(1)
    neg = np.where(q < 0, -q, 0).sum(1)
    return np.maximum(pos * hi + neg * (-lo), pos * (-lo) + neg * hi)


def accumulator_bits_needed(max_abs: int) -> int:
    """Bits of the smallest signed accumulator holding every value in ``[-m, m]``:
    ``ceil(log2(m + 1)) + 1`` (1 for m = 0)."""
    return int(max_abs).bit_length() + 1


def grid_params(w: torch.Tensor, fmt: str, c: HardwareConstraints | None, sym: bool = True,
                group_size: int | None = None, name: str = "layer"):
    """``(scale, zero_point or None)`` of the grid of ``w`` (rows, K) under ``c``: the one
    place every method's scale / zero point choice goes through (WeightOnly / Static /
    Dynamic through :func:`constrained_weight`, RTN, GPTQ's per-group / per-column-block
    choice, AWQ's search). Per row (``group_size`` None; one value for all rows when
    ``c.per_tensor``) or per group of ``group_size`` along K (shape (rows, K // g)).
    Symmetric (``sym`` or ``c.symmetric``): ``amax / qmax`` (``amax / max_value`` for a float
    format); else qkern's min-max rule over the range widened to hold 0,
    ``(hi - lo) / (qmax - qmin)``, zero point ``qmin - round(lo / scale)`` (int32). With
    ``c.pow2_scales`` the scale is :func:`pow2_ceil`'d first and the zero point computed
    from the power-of-two scale.

    >>> s, z = grid_params(torch.tensor([[0.3, -0.9]]), "int4",
    ...                    HardwareConstraints(pow2_scales=True))
    >>> float(s[0]), z  # 0.9 / 7 = 0.129, rounded up to 2^-2
    (0.25, None)
    """
    c = c or HardwareConstraints()
    f = QF.get(fmt)
    sym = sym or c.symmetric or f.kind != "int"
    w = w.detach().float()
    if w.dim() != 2:
        raise ValueError(f"{name}: grid_params needs a 2-D (rows, K) weight, got {w.dim()}-D")
    if group_size is not None:
        if c.per_tensor:
            raise ValueError(f"{name}: per_tensor hardware constraints need group_size=None "
                             f"(one scale per layer), got group_size={group_size}")
        if w.shape[1] % group_size:
            raise ValueError(f"{name}: group_size={group_size} does not divide {w.shape[1]}")
        wg = w.reshape(w.shape[0], -1, group_size)
    else:
        wg = w.reshape(w.shape[0], 1, -1)
    top = float(f.qmax if f.kind == "int" else f.max_value)
    if top <= 0:
        raise ValueError(f"{name}: hardware constraints need a format with a positive "
                         f"largest value, got {fmt}")
    if sym:
        amax = wg.abs().amax(-1)
        if c.per_tensor:
            amax = amax.max().expand_as(amax)
        scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
        lo = None
    else:
        lo, hi = wg.amin(-1).clamp_max(0.0), wg.amax(-1).clamp_min(0.0)
        if c.per_tensor:
            lo, hi = lo.min().expand_as(lo), hi.max().expand_as(hi)
        scale = (hi - lo) / float(f.qmax - f.qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if c.pow2_scales:
        scale = pow2_ceil(scale)
    zp = None
    if lo is not None:
        zp = (f.qmin - torch.round(lo / scale)).clamp(f.qmin, f.qmax).to(torch.int32)
    if group_size is None:
        scale, zp = scale[:, 0], None if zp is None else zp[:, 0]
    return scale.contiguous(), None if zp is None else zp.contiguous()


def fit_l1_budget(w: torch.Tensor, scale: torch.Tensor, fmt: str, c: HardwareConstraints):
    """With ``c.accumulator_method == "scale"`` (and per-channel scales): the symmetric
    per-row ``scale`` of ``w`` (rows, K) coarsened for each row whose round-to-nearest codes
    exceed the l1 budget (``s * l1 / budget``, power of two when asked, up to 20 rounds).
    Returns ``(scale, codes)``: the codes rounded to nearest at that scale (int64), not yet
    projected; GPTQ takes only the scale (its column loop keeps the budget itself)."""
    f = QF.get(fmt)
    budget = c.l1_budget()
    q = torch.round(w / scale[:, None]).clamp(f.qmin, f.qmax).to(torch.int64)
    if budget is None or c.accumulator_method != "scale" or c.per_tensor:
        return scale, q
    for _ in range(20):
        l1 = q.abs().sum(1)
        over = l1 > budget
        if not bool(over.any()):
            break
        grow = torch.where(over, l1.double() / budget, torch.ones_like(l1.double()))
        scale = (scale.double() * grow).float()
        scale = torch.where(over, torch.nextafter(scale, torch.full_like(scale, 1e30)), scale)
        if c.pow2_scales:
            scale = pow2_ceil(scale)
        q = torch.round(w / scale[:, None]).clamp(f.qmin, f.qmax).to(torch.int64)
    return scale, q


def constrained_weight(w: torch.Tensor, fmt: str, c: HardwareConstraints, name: str = "layer"):
    """``(w_exact, scale, codes)`` for a weight matrix (out, K) under ``c``: symmetric scales
    per output channel (one for all when ``per_tensor``; :func:`grid_params`), power-of-two
    when asked, the codes rounded to nearest (ties to even) and, with ``accumulator_bits``,
    brought to the l1 budget (:func:`fit_l1_budget`, then :func:`l1_project_int`).
    ``w_exact = codes * scale`` quantizes back to ``codes`` with ``scale``."""
    f = QF.get(fmt)
    if c.accumulator_bits is not None and f.kind != "int":
        raise ValueError(f"{name}: accumulator_bits needs an integer weight format, got {fmt}")
    w = w.detach().float()
    scale, _ = grid_params(w, fmt, c, True, None, name)
    if f.kind != "int":
        return w, scale.contiguous(), None
    scale, q = fit_l1_budget(w, scale, fmt, c)
    budget = c.l1_budget()
    if budget is not None:
        q = l1_project_int(q, budget)
    return (q.float() * scale[:, None]), scale.contiguous(), q


def whole_layer(c: HardwareConstraints, fmt: str) -> bool:
    """True when ``c`` replaces a layer's grid by :func:`constrained_weight`'s symmetric
    per-channel (or per-tensor) one (an accumulator bound, per-tensor scales, or a float
    format); False: :func:`grid_params` per group, zero points kept unless symmetric."""
    return c.accumulator_bits is not None or c.per_tensor or QF.get(fmt).kind != "int"


def symmetric_weights(c: HardwareConstraints | None, fmt: str, sym: bool) -> bool:
    """Whether a layer asked for ``sym`` gets symmetric weights under ``c``: also when ``c``
    is ``symmetric`` or :func:`whole_layer` (its grid is symmetric per channel / tensor)."""
    return sym or (c is not None and c.touches_weights() and (c.symmetric or whole_layer(c, fmt)))


def constrained_fake_weight(w: torch.Tensor, fmt: str, c: HardwareConstraints, sym: bool,
                            group_size: int | None, name: str = "layer") -> torch.Tensor:
    """The float weight (out, K) a layer quantized from ``w`` under ``c`` holds (no gradient):
    what ``layers.weight_module(..., constraints=c)`` stores, for the methods that train
    through the quantized weight (OmniQuant's LWC, ZeroQuant's LKD) to see it in the forward.
    :func:`constrained_weight`'s ``codes * scale`` when :func:`whole_layer`; otherwise
    qkern's quantize (the layer's own op) with :func:`grid_params`' scales / zero points
    (``group_size`` None or K: per row).

    >>> w = torch.tensor([[0.3, -0.9, 0.5, 0.1]])
    >>> constrained_fake_weight(w, "int4", HardwareConstraints(pow2_scales=True), True, None)
    tensor([[ 0.2500, -1.0000,  0.5000,  0.0000]])
    """
    w = w.detach().float()
    if whole_layer(c, fmt):
        return constrained_weight(w, fmt, c, name)[0]
    g = None if group_size is None or group_size == w.shape[1] else group_size
    scale, zp = grid_params(w, fmt, c, sym, g, name)
    kw = ({"granularity": "channel", "axis": 0} if g is None
          else {"granularity": "group", "axis": 1, "group_size": g})
    return quantize(w, fmt, symmetric=zp is None, scale=scale, zero_point=zp,
                    **kw).dequantize().float()


def check_dynamic_activations(c: HardwareConstraints | None, per_token: bool, what: str,
                              fix: str) -> None:
    """ValueError when ``c`` asks what int8 activations quantized at run time (per token, or
    per tensor when ``per_token`` is False) cannot give: power-of-two scales (the scale is
    ``max|x| / 127`` of each call), ``per_tensor`` with per-token scales, or more than the
    accumulator bound's ``input_bits`` (:func:`check_input_format`). ``fix``: what to use
    instead (the message's end)."""
    if c is None:
        return
    if c.pow2_scales:
        raise ValueError(f"{what} computes activation scales at run time, which cannot be made "
                         f"powers of two; {fix}")
    if c.per_tensor and per_token:
        raise ValueError(f"{what}: per_tensor constraints need per-tensor activation scales, "
                         f"but its activations are quantized per token; {fix}")
    check_input_format(c, "int8", what)


def check_input_format(c: HardwareConstraints | None, act_fmt: str, what: str) -> None:
    """ValueError when integer inputs of ``act_fmt`` can exceed the ``max |x_int|`` the
    accumulator bound of ``c`` was computed for."""
    if c is None or c.accumulator_bits is None:
        return
    f = QF.get(act_fmt)
    top = max(-f.qmin, f.qmax) if f.kind == "int" else None
    if top is None or top > c.max_abs_input():
        raise ValueError(f"{what}: activations in {act_fmt} reach |x| = "
                         f"{'unbounded codes' if top is None else top}, but the accumulator "
                         f"bound assumes {c.input_bits}-bit "
                         f"{'signed' if c.input_signed else 'unsigned'} inputs (max |x| = "
                         f"{c.max_abs_input()}); set input_bits / input_signed to match")


def constrain_activation(scale: torch.Tensor, zero_point, c: HardwareConstraints | None,
                         name: str = "layer"):
    """An activation (scale, zero point) from an observer, under ``c``: power-of-two scale
    rounded up; a zero point is refused when ``symmetric``."""
    if c is None:
        return scale, zero_point
    if c.symmetric and zero_point is not None:
        raise ValueError(f"{name}: the hardware constraints are symmetric but the activation "
                         "observer gave a zero point (set act_symmetric=True)")
    if c.pow2_scales:
        scale = pow2_ceil(scale)
    return scale, zero_point
