"""QuantLinear: a Linear layer holding quantized weights, and replace_linear for whole models.

Weights are quantized once with ``qkern.quantize`` (any weight format); ``forward`` runs the
fused qkern matmul kernel the kernel table (``qkern.kernels``) picks for the weight
(``.kernel`` names it) and otherwise dequantizes the weight and calls ``F.linear``
(``kernel == "dequant"``), so every format works and the fast ones are fast. A layer on the
"dequant" path says why in ``.kernel_reason`` and warns once per distinct reason
(:class:`KernelFallbackWarning`).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from torch import nn

from .. import formats as QF
from .. import kernels
from .._checks import warn_user
from ..quantize import quantize
from ..tensor import QTensor

# int8_dynamic: per token (row of x); int8_dynamic_tensor: one scale per call; int8_static: a
# fixed scale from calibration (act_scale); binary: XNOR-Net sign activations; int8_mixed:
# LLM.int8, per token int8 except the outlier columns (|x| >= threshold), computed in float;
# int8_token: per token int8 (quantized, dequantized) in front of any weight's float kernel
ACTS = ("none", "int8_dynamic", "int8_dynamic_tensor", "int8_static", "binary", "int8_mixed",
        "int8_token")
MODES = ("exact", "fast")


class KernelFallbackWarning(UserWarning):
    """A QuantLinear runs the slow "dequant" path: no fused kernel takes its weight."""


_WARNED: set[str] = set()  # reasons already warned about (one warning per distinct reason)


def _warn_fallback(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warn_user(f"QuantLinear runs the slow 'dequant' path (weights decoded at every call): "
              f"{reason}", KernelFallbackWarning)


def check_threshold(threshold: float | torch.Tensor) -> torch.Tensor:
    """LLM.int8's outlier threshold as a 1-element float32 tensor: a number >= 0 (0: every
    input column is computed in float; inf: none is), else ValueError."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, torch.Tensor)):
        raise ValueError(f"threshold must be a number >= 0, got {type(threshold).__name__}")
    t = torch.as_tensor(threshold, dtype=torch.float32).detach().reshape(-1).clone()
    if t.numel() != 1 or bool(torch.isnan(t).any()) or float(t[0]) < 0:
        raise ValueError(f"threshold must be a number >= 0 (inf: no outliers), got {threshold}")
    return t


def _check_frozen(bufs: dict[str, torch.Tensor]) -> None:
    for name, t in bufs.items():
        if t.requires_grad:
            raise RuntimeError(f"QuantLinear: buffer {name!r} requires grad, but a quantized "
                               "weight is frozen: QuantLinear gives gradients to its input (and "
                               "to bias when bias.requires_grad); set requires_grad=False on it")


def _plain_call(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a forward can skip the torch op dispatcher: a plain CPU tensor, nothing to
    differentiate, and no tracing, compiling or torch function / dispatch mode that must see
    the op (torch.compile, torch.export, jit.trace, FakeTensor, FlopCounterMode, ...)."""
    if type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None
                                                        and bias.requires_grad)):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._is_torch_function_mode_enabled())


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored quantized (``weight_q``, a QTensor) and packed for its
    kernel. Build with :meth:`from_float`.

    Differentiable with respect to ``x`` through the same weights (``grad_x = grad_y @ W``,
    straight-through for the kernels that quantize the activations); the quantized weight is
    frozen. ``bias`` is a Parameter with ``requires_grad=False``: ``layer.bias.requires_grad_()``
    makes it trainable (grad = grad_y summed over the rows)."""

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None, act: str = "none",
                 mode: str = "exact", act_scale: float | torch.Tensor | None = None,
                 threshold: float | torch.Tensor | None = None):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if len(qweight.shape) != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(qweight.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.act, self.mode = act, mode
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)
        if (act == "int8_static") != (act_scale is not None):
            raise ValueError("act_scale is given with (and only with) act='int8_static'")
        chosen = kernels.select(qweight, act, mode)
        self.kernel, self.kernel_reason = chosen.name, chosen.reason
        buffers = chosen.kernel.pack(qweight, act, mode)
        if act_scale is not None:
            sx = torch.as_tensor(act_scale, dtype=torch.float32).reshape(1).clone()
            if not bool(torch.isfinite(sx).all()) or float(sx) <= 0:
                raise ValueError(f"act_scale must be a positive finite number, got {act_scale}")
            buffers["act_scale"] = sx
        if (act == "int8_mixed") != (threshold is not None):
            raise ValueError("threshold is given with (and only with) act='int8_mixed'")
        if threshold is not None:
            buffers["outlier_threshold"] = check_threshold(threshold)
        for name, t in buffers.items():
            self.register_buffer(name, t, persistent=True)
        self._buffer_names = tuple(buffers)
        self._impl = chosen.kernel
        # format and layout only: the codes live in the packed buffers, not twice in memory
        self.weight_q = replace(qweight, codes=None)
        if self.kernel_reason is not None:
            _warn_fallback(self.kernel_reason)

    @classmethod
    def from_float(cls, linear: nn.Linear, fmt: str = "int4", *, group_size: int | None = 128,
                   symmetric: bool = True, act: str = "none", mode: str = "exact",
                   act_scale: float | torch.Tensor | None = None,
                   threshold: float | torch.Tensor | None = None,
                   **quant_kwargs) -> QuantLinear:
        """Quantize ``linear.weight`` (out, in): per output channel when ``group_size`` is None,
        else in groups of ``group_size`` along the input dimension (block formats default to
        their own block)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        f = QF.get(fmt)
        w = linear.weight.detach().float()
        if group_size is None and f.block_size is None:
            q = quantize(w, f, granularity="channel", axis=0, symmetric=symmetric, **quant_kwargs)
        else:
            g = group_size if group_size is not None else f.block_size
            if w.shape[1] % g:
                raise ValueError(f"group_size={g} does not divide in_features={w.shape[1]}; "
                                 "pass group_size=None for per-channel scales")
            q = quantize(w, f, granularity="group", axis=1, group_size=g, symmetric=symmetric,
                         **quant_kwargs)
        return cls(q, linear.bias, act=act, mode=mode, act_scale=act_scale, threshold=threshold)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """Names of the kernel's packed buffers (plus ``act_scale`` for int8_static,
        ``outlier_threshold`` for int8_mixed)."""
        return self._buffer_names

    def packed_buffers(self) -> dict[str, torch.Tensor]:
        """The kernel's packed buffers by name (what ``forward`` hands the kernel)."""
        return {n: getattr(self, n) for n in self._buffer_names}

    def quantized_weight(self) -> QTensor:
        """The weight as a QTensor read back from the packed buffers (codes, scales and zero
        points in the user layout, as ``qkern.quantize`` gave them): what exporters write."""
        return self._impl.unpack(self.kernel, self.weight_q, self.packed_buffers())

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight (out, in) the layer computes with, decoded from its buffers."""
        return self._impl.weight(self.kernel, self.weight_q, self.packed_buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"QuantLinear takes a floating-point input (float32, bfloat16, "
                            f"float16), got {what}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dim {self.in_features}, got {x.shape[-1]}")
        bias = self.bias
        if _plain_call(x, bias):
            run = self._plan(bias)
            if run is not None:
                if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
                    return run(x)
                y = run(x.reshape(-1, self.in_features).float().contiguous())
                y = y.reshape(*x.shape[:-1], self.out_features)
                return y.to(x.dtype) if x.dtype != y.dtype else y
        bufs = self.packed_buffers()
        if torch.is_grad_enabled():
            _check_frozen(bufs)
        y = self._impl.forward(self.kernel, x, bufs, self.bias, self.out_features,
                               self.in_features, self.weight_q)
        return y.to(x.dtype) if x.dtype != y.dtype else y

    def _plan(self, bias: torch.Tensor | None):
        """The kernel's dispatcher-free CPU call (Kernel.plan) for the current buffers, made
        once and remade when a buffer, the bias or the kernel changes (identity, in-place
        version or requires_grad); None when the kernel has none, a buffer is not on the CPU
        or requires grad (the op path then says why)."""
        b = self._buffers
        key = [self.kernel, id(bias), bias is not None and bias._version]
        for n in self._buffer_names:
            t = b[n]
            key += (id(t), t._version, t.requires_grad)
        cached = self.__dict__.get("_plan_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        bufs = self.packed_buffers()
        run = None
        if all(t.device.type == "cpu" and not t.requires_grad for t in bufs.values()):
            run = self._impl.plan(self.kernel, bufs, bias, self.out_features,
                                  self.in_features, self.weight_q)
        self.__dict__["_plan_cache"] = (key, run)
        return run

    def extra_repr(self) -> str:
        q = self.weight_q
        gran = (f"group_size={q.group_size}" if q.granularity == "group" else q.granularity)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={q.format.name}, {gran}, symmetric={q.zero_point is None}, "
                f"bits_per_weight={q.bits_per_element:.3f}, act={self.act}, mode={self.mode}, "
                f"kernel={self.kernel}, bias={self.bias is not None}"
                + (f", threshold={float(self.outlier_threshold)}" if self.act == "int8_mixed"
                   else ""))


#: called with every model replace_linear, quantize_model, convert and qkern.load return
#: (qkern.hf registers one giving a transformers model what save_pretrained needs)
_ON_QUANTIZED: list[Callable[[nn.Module], None]] = []


def on_quantized(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Registers ``fn(model)``, called with each model that ``replace_linear``,
    ``quantize_model``, ``convert`` and ``qkern.load`` return (once per function, in
    registration order)."""
    if fn not in _ON_QUANTIZED:
        _ON_QUANTIZED.append(fn)
    return fn


def notify_quantized(model: nn.Module) -> nn.Module:
    """Runs the :func:`on_quantized` functions on ``model``; returns it."""
    for fn in _ON_QUANTIZED:
        fn(model)
    return model


Spec = dict | Callable[[str, nn.Linear], dict | None]


def replace_linear(model: nn.Module, spec: Spec, skip: Iterable[str] = (),
                   inplace: bool = False) -> nn.Module:
    """Swap every nn.Linear of ``model`` for a QuantLinear.

    ``spec``: keyword arguments for :meth:`QuantLinear.from_float` (e.g. ``{"fmt": "int4",
    "group_size": 128}``), or a function ``(name, linear) -> kwargs or None`` (None keeps the
    layer in float). ``skip``: module names or fnmatch patterns left in float (e.g.
    ``["lm_head", "*.gate"]``). The model is copied unless ``inplace=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    skip = list(skip)
    target = model if inplace else copy.deepcopy(model)
    for name, mod in list(target.named_modules()):
        if not isinstance(mod, nn.Linear) or any(fnmatch.fnmatch(name, p) for p in skip):
            continue
        kw = spec(name, mod) if callable(spec) else dict(spec)
        if kw is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, QuantLinear.from_float(mod, **kw))
    return notify_quantized(target)
