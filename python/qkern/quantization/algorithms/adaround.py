"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"): per layer, whether each weight rounds up or down is learned on calibration
data, then fixed.

With scale s (and zero point z) from the data range, each weight is
``W~ = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)`` where
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (zeta = 1.1, gamma = -0.1, the
rectified sigmoid). V starts where h(V) equals the fractional part of W / s (W~ = W inside the
grid) and is trained with Adam on

    mean over input rows x of ||W x - W~ x^||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

(x^ = the same row produced by the already-quantized prefix when ``quantized_inputs``, the
paper's section 5; else x). The regulariser is off for the first ``warmup`` fraction of the
steps, then beta falls linearly from ``beta_start`` (20) to ``beta_end`` (2), pushing every h
to 0 or 1. Finally h >= 0.5 rounds up. Layers go in execution order.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ... import formats as QF
from ...quantize import quantize
from ..calibration import capture_inputs, float_copy, sequential_calibration, weight_matrix
from ..layers import effective_group, warn_notes, weight_module
from ..registry import (
    BaseConfig,
    Quantizer,
    check_bool,
    check_choice,
    check_format,
    check_group,
    check_int,
    check_real,
    config_class,
    fail,
    register_quantizer,
)
from .clip_search import CLIP_SEARCHES, output_clip_search
from .equalization import equalize

__all__ = ["AdaRoundConfig", "AdaRoundQuantizer", "ZETA", "GAMMA", "adaround_weight",
           "beta_schedule", "inverse_rectified_sigmoid", "rectified_sigmoid",
           "rounding_regularizer"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with h(V) = h for h in (0, 1) (the starting point of the optimisation)."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): 0 when every h is 0 or 1, largest at h = 0.5."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_schedule(step: int, iterations: int, warmup: float = 0.2, beta_start: float = 20.0,
                  beta_end: float = 2.0) -> tuple[bool, float]:
    """(regulariser on?, beta) at ``step`` (0-based): off during the first
    ``warmup * iterations`` steps, then beta decays linearly from beta_start to beta_end
    over the remaining steps."""
    start = warmup * iterations
    if step < start:
        return False, beta_start
    frac = (step - start) / max(iterations - start, 1.0)
    return True, beta_end + (beta_start - beta_end) * max(0.0, 1.0 - frac)


def _expand(t: torch.Tensor | None, shape: tuple[int, int], group: int | None,
            per_channel: bool) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.float()
    if per_channel:
        return t.reshape(-1, 1).expand(shape)
    return t.repeat_interleave(group, dim=1)


def adaround_weight(w: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor | None, fmt: str, *,
                    group_size: int | None = None, symmetric: bool = True,
                    scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None,
                    iterations: int = 300, lr: float = 5e-2, batch_size: int = 256,
                    reg_weight: float = 0.3, beta_start: float = 20.0, beta_end: float = 2.0,
                    warmup: float = 0.2, seed: int = 0, log=None) -> dict:
    """Learned rounding of ``w`` (out, K) for input rows ``x`` (N, K) (``x_hat``: the rows
    the quantized layer will see; None = ``x``). Scales: ``scale`` / ``zero_point`` in the
    layout of ``group_size`` (None: per output channel) or from the data range.

    Returns {"codes": int64 (out, K), "scale", "zero_point" (user layout), "weight": the
    dequantized float32 weight s * (codes - z), "nearest": the codes of rounding to
    nearest, "loss": final reconstruction loss (hard rounding), "loss_nearest"}."""
    # trains V even when called under torch.no_grad() / inference_mode()
    with torch.inference_mode(False), torch.enable_grad():
        return _adaround(w.detach().float().clone(), x.detach().float().clone(),
                         None if x_hat is None else x_hat.detach().float().clone(), fmt,
                         group_size, symmetric, scale, zero_point, iterations, lr, batch_size,
                         reg_weight, beta_start, beta_end, warmup, seed, log)


def _adaround(w, x, x_hat, fmt, group_size, symmetric, scale, zero_point, iterations, lr,
              batch_size, reg_weight, beta_start, beta_end, warmup, seed, log) -> dict:
    f = QF.get(fmt)
    x_hat = x if x_hat is None else x_hat
    per_channel = group_size is None
    gran = ({"granularity": "channel", "axis": 0} if per_channel else
            {"granularity": "group", "axis": 1, "group_size": group_size})
    if scale is None:
        q0 = quantize(w, f, symmetric=symmetric, **gran)
        scale, zero_point = q0.scale, q0.zero_point
    s = _expand(scale, tuple(w.shape), group_size, per_channel)
    z = _expand(zero_point, tuple(w.shape), group_size, per_channel)
    z = torch.zeros_like(w) if z is None else z
    t = w * (1.0 / s)  # float32 product, as the quantize kernels
    w_floor = torch.floor(t)
    nearest = torch.clamp(torch.round(t) + z, f.qmin, f.qmax)
    target = x @ w.T

    def soft(h, rows):
        wq = s * (torch.clamp(w_floor + h + z, f.qmin, f.qmax) - z)
        return ((x_hat[rows] @ wq.T - target[rows]) ** 2).sum(1).mean()

    v = inverse_rectified_sigmoid(t - w_floor).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    for step in range(iterations):
        rows = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        h = rectified_sigmoid(v)
        rec = soft(h, rows)
        on, beta = beta_schedule(step, iterations, warmup, beta_start, beta_end)
        loss = rec + reg_weight * rounding_regularizer(h, beta) if on else rec
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (step % max(iterations // 5, 1) == 0 or step == iterations - 1):
            log(f"step {step}: reconstruction {float(rec):.6g}, beta {beta:.2f}, "
                f"undecided {(h.detach() - 0.5).abs().lt(0.4).float().mean():.3f}")
    with torch.no_grad():
        up = (rectified_sigmoid(v) >= 0.5).float()
        codes = torch.clamp(w_floor + up + z, f.qmin, f.qmax)
        weight = (codes - z) * s
        loss = float(((x_hat @ weight.T - target) ** 2).sum(1).mean())
        loss_nearest = float(((x_hat @ ((nearest - z) * s).T - target) ** 2).sum(1).mean())
    return {"codes": codes.to(torch.int64), "scale": scale, "zero_point": zero_point,
            "weight": weight, "nearest": nearest.to(torch.int64), "loss": loss,
            "loss_nearest": loss_nearest}


@config_class
@dataclass
class AdaRoundConfig(BaseConfig):
    """Weight-only quantization with learned rounding (AdaRound, Nagel et al. 2020): per
    layer, each weight rounds up or down as a rectified-sigmoid variable trained to keep the
    layer's output on calibration inputs, then fixed. Integer formats, per output channel
    (``group_size=None``) or in groups along the input dim; calibration data is required."""

    fmt: str = "int4"
    group_size: int | None = None
    symmetric: bool = True
    # defaults for a few hundred steps (the paper: 10k-20k steps, lr 1e-3, lambda 0.01)
    iterations: int = 300  # Adam steps per layer
    lr: float = 5e-2
    batch_size: int = 256  # input rows (tokens / pixels) per step
    reg_weight: float = 0.3  # lambda of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of the steps before the regulariser starts
    quantized_inputs: bool = True  # W~ sees the quantized prefix's inputs (paper, sec. 5)
    clip_search: str = "none"  # "output": scales from the output-error clip search first
    cross_layer_equalization: bool = False
    seed: int = 0
    verbose: bool = False

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_format(n, "fmt", self.fmt)
        f = QF.get(self.fmt)
        if f.kind != "int" or f.name == "ternary" or f.qmax - f.qmin < 1:
            fail(n, "fmt", "an integer format (int2..int8, uint2..uint8)", self.fmt)
        check_group(n, "group_size", self.group_size)
        check_bool(n, "symmetric", self.symmetric)
        check_int(n, "iterations", self.iterations, 1)
        check_real(n, "lr", self.lr, 1e-12, 1e3, "a positive number")
        check_int(n, "batch_size", self.batch_size, 1)
        check_real(n, "reg_weight", self.reg_weight, 0.0, float("inf"), "a number >= 0")
        check_real(n, "beta_start", self.beta_start, 1e-6, 1e6, "a positive number")
        check_real(n, "beta_end", self.beta_end, 1e-6, 1e6, "a positive number")
        if self.beta_end > self.beta_start:
            fail(n, "beta_end", f"<= beta_start ({self.beta_start})", self.beta_end)
        check_real(n, "warmup", self.warmup, 0.0, 0.999, "a fraction in [0, 1)")
        check_bool(n, "quantized_inputs", self.quantized_inputs)
        check_choice(n, "clip_search", self.clip_search, CLIP_SEARCHES)
        check_bool(n, "cross_layer_equalization", self.cross_layer_equalization)
        check_int(n, "seed", self.seed, 0)
        check_bool(n, "verbose", self.verbose)
        super().__post_init__()


@register_quantizer(AdaRoundConfig)
class AdaRoundQuantizer(Quantizer):
    """Weight-only quantization with AdaRound's learned rounding for Linear / Conv layers."""

    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)

    def prepare(self, model: nn.Module) -> None:
        equalize(model, self.config)
        super().prepare(model)

    def records_inputs(self) -> bool:
        return True

    def needs_calibration(self) -> str | None:
        return "learns each layer's rounding on calibration inputs"

    def calibrated(self, model: nn.Module) -> bool:
        return bool(self.batches)

    def convert(self, model: nn.Module) -> None:
        notes: dict[str, str] = {}
        batches, cfgs = self.batches, dict(self.plan)
        float_ref = float_copy(model)
        self.losses: dict[str, tuple[float, float]] = {}

        def finish(i: int, name: str) -> None:
            cfg, mod = cfgs[name], model.get_submodule(name)
            log = None
            if cfg.verbose:
                def log(msg, _n=name):
                    print(f"qkern adaround {_n}: {msg}", file=sys.stderr, flush=True)
            try:
                group = effective_group(mod, cfg.fmt, cfg.group_size, notes, name)
                w = weight_matrix(mod)
                x = capture_inputs(float_ref, name, batches)
                x_hat = capture_inputs(model, name, batches) if cfg.quantized_inputs else x
                given = {}
                if cfg.clip_search == "output":  # E||W x - W_q x^||^2, as progressive
                    xq = x_hat.double()
                    cross = None if x_hat is x else (xq.T @ x.double()) / xq.shape[0]
                    given, _ = output_clip_search(w, (xq.T @ xq) / xq.shape[0], cfg.fmt,
                                                  group_size=group, symmetric=cfg.symmetric,
                                                  cross=cross)
                r = adaround_weight(w, x, x_hat, cfg.fmt, group_size=group,
                                    symmetric=cfg.symmetric, iterations=cfg.iterations,
                                    lr=cfg.lr, batch_size=cfg.batch_size,
                                    reg_weight=cfg.reg_weight, beta_start=cfg.beta_start,
                                    beta_end=cfg.beta_end, warmup=cfg.warmup,
                                    seed=cfg.seed + i, log=log, **given)
            except ValueError as e:
                self.skipped[name] = str(e)
                return
            self.losses[name] = (r["loss_nearest"], r["loss"])
            if log is not None:
                log(f"output MSE nearest {r['loss_nearest']:.6g} -> adaround {r['loss']:.6g}")
            rounded = _with_weight(mod, r["weight"])
            params = {"scale": r["scale"], "zero_point": r["zero_point"]}
            self.swap(model, name, lambda: _checked(
                weight_module(rounded, cfg.fmt, group, notes, name,
                              params=lambda w, g: params, symmetric=cfg.symmetric),
                r["weight"], name))

        sequential_calibration(model, list(cfgs), batches, finish)
        warn_notes(notes)


def _with_weight(mod: nn.Module, w2d: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(mod)
    with torch.no_grad():
        new.weight.copy_(w2d.view_as(new.weight))
    return new


def _checked(layer: nn.Module, want: torch.Tensor, name: str) -> nn.Module:
    """The built layer must compute with exactly the learned weight (qkern.quantize of
    s * (codes - z) with the given s, z gives back the codes)."""
    got = layer.dequantize_weight().reshape(want.shape)
    if not torch.equal(got, want):
        bad = int((got != want).sum())
        raise RuntimeError(f"{name}: {bad} weight(s) changed when the AdaRound codes were "
                           "packed; please report this")
    return layer
