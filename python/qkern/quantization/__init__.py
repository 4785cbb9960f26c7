"""The quantization workflow: configs, ``prepare`` / ``convert`` / ``quantize_model`` and the
quantizer registry (README "Quantization workflow")."""

from . import adaround, quantizers  # noqa: F401  (registers the built-in quantizers)
from .api import Quantizer, convert, prepare, quantize_model, register_quantizer, run_calibration
from .config import (
                  ActivationOnlyConfig,
                  AdaRoundConfig,
                  BaseConfig,
                  DynamicConfig,
                  StaticConfig,
                  WeightOnlyConfig,
                  config_class,
)
from .correction import bias_correction, cross_layer_equalization, smooth_quant

__all__ = ["ActivationOnlyConfig", "AdaRoundConfig", "BaseConfig", "DynamicConfig", "Quantizer",
           "StaticConfig", "WeightOnlyConfig", "bias_correction", "config_class", "convert",
           "cross_layer_equalization", "prepare", "quantize_model", "register_quantizer",
           "run_calibration", "smooth_quant"]
