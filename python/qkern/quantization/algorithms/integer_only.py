"""Integer-only inference (TFLite / gemmlowp style; Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"): int8 symmetric
per-channel weights, int8 activations with static ranges from calibration, int32 biases
``round(b / (s_in s_w))``, and each layer's int32 accumulator requantized to the next layer's
input scale by a fixed-point multiplier ``m0`` and ``shift`` (qkern.fixed_point), a ReLU after
a layer folded into its clamp. docs/integer_only.md.

Two forms:

- ``mode="model"`` (``"auto"`` picks it when it applies): an ``nn.Sequential`` of Linear /
  Conv2d layers, ReLU, MaxPool2d / AvgPool2d, Flatten, Dropout / Identity is converted in place
  into integer modules (qkern.nn.integer): its forward takes int8 codes and returns int8 codes,
  with no float operation inside; :class:`~qkern.nn.integer.IntegerModel` adds the float
  boundary (quantize the input, dequantize the output).
- ``mode="layers"`` (any other model, e.g. MiniLM): each Linear becomes an
  :class:`~qkern.nn.integer.IntegerLinearIO`: its float input quantized with the calibrated
  input scale, the integer-only matmul and requantization to the calibrated output range,
  dequantized back to float. The consumer of the output is a float op (LayerNorm, GELU,
  softmax, residual add), so the output codes are int16 by default (``layers_out_bits``): the
  same fixed-point requantization, 257 times finer steps over the same calibrated range. Only
  the layers are integer-only, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...fixed_point import quantize_multipliers
from ...nn.integer import (
    FloatBoundary,
    IntegerAvgPool2d,
    IntegerConv2d,
    IntegerLinear,
    IntegerLinearIO,
    IntegerMaxPool2d,
    IntegerReLU,
)
from ...quantize import quantize
from ..layers import OBSERVER_NAMES, ObservingQuantizer, input_observer
from ..registry import (
    BaseConfig,
    check_bool,
    check_choice,
    config_class,
    fail,
    register_quantizer,
)

__all__ = ["IntegerOnlyConfig", "IntegerOnlyQuantizer", "integer_layer", "widen_to_int16"]

MODES = ("auto", "model", "layers")
PASS = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)


@config_class
@dataclass
class IntegerOnlyConfig(BaseConfig):
    """int8 weights (symmetric, per output channel unless ``per_channel=False``), int8
    activations (asymmetric unless ``act_symmetric``; ranges from the ``observer`` over the
    calibration data), int32 biases, fixed-point requantization between layers.
    ``layers_out_bits`` (16 or 8): the width of the output codes in ``layers`` mode, where the
    output goes to a float op (in ``model`` mode each output is the next layer's int8 input).

    >>> import torch, qkern
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> calib = [torch.randn(32, 8) for _ in range(4)]
    >>> q = qkern.quantize_model(model, qkern.IntegerOnlyConfig(), calibration=calib)
    >>> im = qkern.IntegerModel(q)            # int8 -> int8, float boundary outside
    >>> codes = im(im.quantize(torch.randn(2, 8)))
    >>> codes.dtype
    torch.int8
    """

    observer: str = "minmax"
    act_symmetric: bool = False
    per_channel: bool = True
    mode: str = "auto"
    layers_out_bits: int = 16

    act_fmt = "int8"  # what input_observer reads (not a field: always int8)

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_choice(n, "observer", self.observer, OBSERVER_NAMES)
        check_bool(n, "act_symmetric", self.act_symmetric)
        check_bool(n, "per_channel", self.per_channel)
        check_choice(n, "mode", self.mode, MODES)
        if type(self.layers_out_bits) is not int:
            fail(n, "layers_out_bits", "8 or 16", self.layers_out_bits)
        check_choice(n, "layers_out_bits", self.layers_out_bits, (8, 16))
        for pat, v in self.overrides.items():
            if isinstance(v, str):
                fail(n, f"overrides[{pat!r}]", "None (keep float) or a dict of fields", v)
        super().__post_init__()


def _qparams(observer: nn.Module) -> tuple[float, int]:
    scale, zp = observer.calculate_qparams()
    return float(scale), 0 if zp is None else int(zp)


def widen_to_int16(s_out: float, zp_out: int) -> tuple[float, int]:
    """The int16 grid over the real range of the int8 grid ``(s_out, zp_out)``:
    ``[(-128 - zp) s, (127 - zp) s]`` is ``[(-32768 - zp16) s16, (32767 - zp16) s16]`` with
    ``s16 = s / 257`` and ``zp16 = 257 zp + 128`` (exact: 65535 = 255 * 257)."""
    return s_out / 257, 257 * int(zp_out) + 128


def integer_layer(mod: nn.Module, s_in: float, zp_in: int, s_out: float, zp_out: int,
                  qmin: int = -128, per_channel: bool = True, out_bits: int = 8) -> nn.Module:
    """The integer twin of a float Linear / Conv2d: int8 weight codes (qkern.quantize, int8
    symmetric, per output channel or per tensor), int32 bias ``round(b / (s_in s_w))``,
    ``(m0, shift)`` of ``M = s_in s_w / s_out`` (computed in float64), clamp ``[qmin, 127]``
    (``out_bits=16``, Linear only: int16 output codes, clamp ``[qmin, 32767]``)."""
    if out_bits == 16 and not isinstance(mod, nn.Linear):
        raise ValueError("integer_layer: out_bits=16 is for Linear layers (layers mode) only")
    w = mod.weight.detach().float()
    if per_channel:
        qt = quantize(w, "int8", granularity="channel", axis=0)
        s_w = qt.scale.double().reshape(-1)
    else:
        qt = quantize(w, "int8", granularity="tensor")
        s_w = qt.scale.double().reshape(1).expand(w.shape[0])
    codes = qt.codes.view(torch.int8)
    acc_scale = s_in * s_w
    if mod.bias is not None:
        b = torch.round(mod.bias.detach().double() / acc_scale)
        bias_q = b.clamp(-(2**31), 2**31 - 1).to(torch.int32)
    else:
        bias_q = torch.zeros(0, dtype=torch.int32)
    m0, shift = quantize_multipliers(acc_scale / s_out)
    kw = dict(in_zp=zp_in, out_zp=zp_out, qmin=qmin, qmax=127, in_scale=s_in, out_scale=s_out)
    if isinstance(mod, nn.Conv2d):
        return IntegerConv2d(codes, bias_q, m0, shift, mod.stride, mod.padding, **kw)
    if out_bits == 16:
        kw.update(qmax=32767, out_bits=16)
    return IntegerLinear(codes, bias_q, m0, shift, **kw)


def _pool_reason(name: str, m: nn.Module) -> str | None:
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
        if any(pad) or m.ceil_mode or getattr(m, "dilation", 1) not in (1, (1, 1)):
            return f"{name}: pooling with padding, ceil_mode or dilation has no integer form here"
        if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
            return f"{name}: AvgPool2d divisor_override has no integer form here"
    return None


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@register_quantizer(IntegerOnlyConfig)
class IntegerOnlyQuantizer(ObservingQuantizer):
    """Observes every planned layer's input (ObservingQuantizer) and output (a forward hook),
    then converts the whole ``nn.Sequential`` to integer modules or, in ``layers`` mode, each
    layer to an integer-only matmul inside the float model."""

    SUPPORTED = (nn.Linear, nn.Conv2d)

    def unsupported(self, name, mod, cfg):
        why = super().unsupported(name, mod, cfg)
        if why is None and isinstance(mod, nn.Conv2d) and tuple(mod.dilation) != (1, 1):
            why = "dilated convolution is not supported"
        return why

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.outputs: dict[str, nn.Module] = {}
        self.handles = []
        for name, cfg in self.plan:
            obs = self.outputs[name] = input_observer(cfg)
            self.handles.append(model.get_submodule(name).register_forward_hook(
                lambda m, args, y, o=obs: o(y.detach())))

    def sequence_reason(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot become one integer-only network (None: it can)."""
        if type(model) is not nn.Sequential:
            return f"the model is a {type(model).__name__}, not an nn.Sequential"
        if self.skipped:
            return f"layer(s) {sorted(self.skipped)} cannot be converted"
        planned = {n for n, _ in self.plan}
        children = dict(model.named_children())
        if not planned or not planned <= set(children):
            return "the converted layers must be direct children of the nn.Sequential"
        for name, child in children.items():
            if name in planned:
                continue
            if not isinstance(child, PASS) or any(p.dim() >= 2 for p in child.parameters()):
                return f"{name}: {type(child).__name__} has no integer-only form"
            why = _pool_reason(name, child)
            if why:
                return why
        return None

    def convert(self, model: nn.Module) -> None:
        for h in self.handles:
            h.remove()
        cfg = self.config
        why = self.sequence_reason(model)
        if cfg.mode == "model" and why:
            raise ValueError(f"IntegerOnlyConfig(mode='model'): {why}; use mode='layers' for "
                             "integer-only matmuls inside the float model")
        if cfg.mode == "model" or (cfg.mode == "auto" and why is None):
            self._convert_sequence(model)
            return
        for name, lcfg in self.plan:
            mod, scale, zp = self.observed(model, name)
            s_in, zp_in = float(scale), 0 if zp is None else int(zp)
            s_out, zp_out = _qparams(self.outputs[name])
            qmin = -128
            if lcfg.layers_out_bits == 16:
                (s_out, zp_out), qmin = widen_to_int16(s_out, zp_out), -32768
            layer = integer_layer(mod, s_in, zp_in, s_out, zp_out, qmin, lcfg.per_channel,
                                  lcfg.layers_out_bits)
            self.swap(model, name, lambda: IntegerLinearIO(
                FloatBoundary(s_in, zp_in), layer, FloatBoundary(s_out, zp_out)), float_mod=mod)

    def _convert_sequence(self, model: nn.Sequential) -> None:
        cfgs = dict(self.plan)
        names = list(dict(model.named_children()))
        order = [n for n in names if n in cfgs]
        inputs = {}
        for n in order:
            _, scale, zp = self.observed(model, n)
            inputs[n] = (float(scale), 0 if zp is None else int(zp))
        zp_now = inputs[order[0]][1]
        new: dict[str, nn.Module] = {}
        for i, n in enumerate(names):
            child = model.get_submodule(n)
            if n in cfgs:
                k = order.index(n)
                s_out, zp_out = (inputs[order[k + 1]] if k + 1 < len(order)
                                 else _qparams(self.outputs[n]))
                relu = i + 1 < len(names) and isinstance(model.get_submodule(names[i + 1]),
                                                         nn.ReLU)
                qmin = max(-128, zp_out) if relu else -128
                new[n] = integer_layer(child.module, *inputs[n], s_out, zp_out, qmin,
                                       cfgs[n].per_channel)
                if relu:
                    new[names[i + 1]] = nn.Identity()  # folded into the clamp
                zp_now = zp_out
            elif n in new:
                continue
            elif isinstance(child, nn.ReLU):
                new[n] = IntegerReLU(zp_now)
            elif isinstance(child, nn.MaxPool2d):
                new[n] = IntegerMaxPool2d(_pair(child.kernel_size),
                                          _pair(child.stride or child.kernel_size))
            elif isinstance(child, nn.AvgPool2d):
                new[n] = IntegerAvgPool2d(_pair(child.kernel_size),
                                          _pair(child.stride or child.kernel_size))
            elif isinstance(child, nn.Dropout):
                new[n] = nn.Identity()
        for n, m in new.items():
            setattr(model, n, m)
