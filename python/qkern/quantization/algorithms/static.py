"""Static PTQ: weights and activations quantized with ranges fixed in calibration, with the
error corrections of weight-only PTQ plus SmoothQuant and progressive (layer-by-layer)
calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import Gram, float_copy, paired_moments, sequential_calibration
from ..constraints import check_input_format, constrain_activation
from ..layers import (
    OBSERVER_NAMES,
    ActQuant,
    ObservingQuantizer,
    input_observer,
    observer_seen,
    warn_notes,
    weight_module,
)
from ..registry import (
    BaseConfig,
    Quantizer,
    any_layer,
    check_bool,
    check_choice,
    check_format,
    check_group,
    check_real,
    config_class,
    register_quantizer,
)
from .bias_correction import bias_correction
from .clip_search import check_weight_observer, weight_params
from .equalization import equalize
from .smoothquant import smooth_quant
from .weight_only import check_corrections, wants_data

__all__ = ["StaticConfig", "StaticQuantizer"]


@config_class
@dataclass
class StaticConfig(BaseConfig):
    """Weights and activations static: weights quantized per output channel (or in groups),
    activation ranges from calibration. int8 weights with symmetric int8 activations run
    qkern's int8 x int8 -> int32 kernel (W8A8); other formats quantize-dequantize the
    activations on qkern's ops and run the weight kernel."""

    fmt: str = "int8"
    group_size: int | None = None
    symmetric: bool = True
    act_fmt: str = "int8"
    observer: str = "minmax"
    act_symmetric: bool = True
    weight_observer: str = "minmax"  # per-output-channel weight ranges (WEIGHT_OBSERVERS)
    # error correction (equalization, clip_search, bias_correction, smoothquant modules),
    # all from the calibration data
    per_tensor: bool = False  # one weight scale per layer (group_size is then ignored)
    cross_layer_equalization: bool = False
    clip_search: str = "none"  # "output": clip ratio minimising the layer's output error
    bias_correction: bool = False
    progressive: bool = False  # calibrate layer by layer on the already-quantized prefix
    smoothing_alpha: float | None = None  # SmoothQuant migration strength (None: off)

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_format(n, "fmt", self.fmt)
        check_group(n, "group_size", self.group_size)
        check_bool(n, "symmetric", self.symmetric)
        check_format(n, "act_fmt", self.act_fmt)
        check_choice(n, "observer", self.observer, OBSERVER_NAMES)
        check_bool(n, "act_symmetric", self.act_symmetric)
        check_corrections(self)
        check_weight_observer(self)
        check_bool(n, "progressive", self.progressive)
        if self.smoothing_alpha is not None:
            check_real(n, "smoothing_alpha", self.smoothing_alpha, 0.0, 1.0,
                       "None or a number in [0, 1]")
            self.smoothing_alpha = float(self.smoothing_alpha)
        super().__post_init__()


@register_quantizer(StaticConfig)
class StaticQuantizer(ObservingQuantizer):
    APPLIES_CONSTRAINTS = True
    """int8 per-channel symmetric weights with symmetric int8 activations run the W8A8 kernel
    with the calibrated activation scale; any other combination quantizes the activations
    with ActQuant in front of a weight-quantized layer."""

    def _replay(self) -> bool:
        """True when convert() re-runs the recorded calibration batches itself (smoothing,
        progressive calibration, output clip search, bias correction)."""
        return any_layer(self.config, lambda c: wants_data(c) or c.progressive
                         or c.smoothing_alpha is not None)

    def records_inputs(self) -> bool:
        return self._replay()

    def prepare(self, model: nn.Module) -> None:
        equalize(model, self.config)
        if self._replay():  # observers come in convert()
            Quantizer.prepare(self, model)
            for name, cfg in self.plan:
                check_input_format(cfg.constraints, cfg.act_fmt, f"StaticConfig ({name})")
        else:
            super().prepare(model)

    def calibrated(self, model: nn.Module) -> bool:
        return bool(self.batches) if self._replay() else super().calibrated(model)

    def convert(self, model: nn.Module) -> None:
        notes: dict[str, str] = {}
        if self._replay():
            self._convert_replay(model, notes)
        else:
            for name, cfg in self.plan:
                mod, scale, zp = self.observed(model, name)
                self._convert_layer(model, name, cfg, mod, scale, zp, notes,
                                    weight_params(cfg, None, notes, name))
        warn_notes(notes)

    def _convert_layer(self, model, name, cfg, mod, scale, zp, notes, params) -> None:
        group = None if cfg.per_tensor else cfg.group_size
        fused = (cfg.fmt == "int8" and group is None and cfg.symmetric
                 and cfg.act_fmt == "int8" and zp is None)
        if fused:
            def make():
                return weight_module(mod, "int8", None, notes, name, params=params,
                                     constraints=cfg.constraints, symmetric=True, act="int8_static",
                                     act_scale=_int8_scale(scale))
        else:
            def make():
                return ActQuant(weight_module(mod, cfg.fmt, group, notes, name,
                                              params=params, symmetric=cfg.symmetric,
                                              constraints=cfg.constraints),
                                cfg.act_fmt, scale, zp)
        self.swap(model, name, make, float_mod=mod)

    def _convert_replay(self, model: nn.Module, notes: dict) -> None:
        """Smoothing, then observers and clip searches: all layers at once, or, when
        ``progressive``, one layer at a time in execution order on the inputs of the
        already-quantized (and bias-corrected) prefix (``sequential_calibration``); then bias
        correction."""
        batches, cfgs = self.batches, dict(self.plan)
        progressive = self.config.progressive
        alphas = {n: c.smoothing_alpha for n, c in self.plan if c.smoothing_alpha is not None}
        if alphas:
            smooth_quant(model, batches, alpha=alphas, inplace=True, layers=list(alphas))
        fixed = [n for n, c in self.plan if c.bias_correction]
        search = {n for n, c in self.plan if c.clip_search == "output"}
        float_ref = float_copy(model) if fixed or (progressive and search) else None
        observers: dict[str, nn.Module] = {}
        grams: dict[str, Gram] = {}

        def hooks(stage: list[str]) -> dict[str, tuple]:
            observers.clear()
            observers.update({n: input_observer(cfgs[n]) for n in stage})
            grams.clear()
            grams.update({n: Gram(model.get_submodule(n)) for n in stage
                          if n in search and not progressive})

            def hook(n):
                def pre(mod, args):
                    observers[n](args[0].detach())
                    if n in grams:
                        grams[n](mod, args)
                return pre

            return {n: (hook(n), None) for n in stage}

        def finish(i: int, n: str) -> None:
            if not observer_seen(observers[n]):
                raise ValueError(f"{n}: the layer did not run on the calibration data")
            scale, zp = constrain_activation(*observers[n].calculate_qparams(),
                                             cfgs[n].constraints, n)
            gram = cross = None
            if n in grams:
                gram = grams[n].matrix()
            elif n in search:  # progressive: E||W x - W_q x^||^2 with x^ the prefix's
                gram, cross = paired_moments(float_ref, model, n, batches)
            self._convert_layer(model, n, cfgs[n], model.get_submodule(n), scale, zp,
                                notes, weight_params(cfgs[n], gram, notes, n, cross))
            if progressive and n in fixed and n not in self.skipped:
                bias_correction(float_ref, model, batches, layers=[n])

        sequential_calibration(model, list(cfgs), batches, finish, hooks,
                               one_at_a_time=progressive)
        if fixed and not progressive:
            bias_correction(float_ref, model, batches,
                            layers=[n for n in fixed if n not in self.skipped])


def _int8_scale(scale: torch.Tensor) -> torch.Tensor:
    """The W8A8 kernel clamps activation codes to [-127, 127]; an observer's symmetric int8
    scale is amax / 127 (qkern's symmetric convention), used as is."""
    return scale.detach().float().reshape(())
