"""The quantization workflow: configs, ``prepare`` / ``convert`` / ``quantize_model`` and the
quantizer registry (README "Quantization workflow")."""

from . import quantizers  # noqa: F401  (registers the built-in quantizers)
from .api import Quantizer, convert, prepare, quantize_model, register_quantizer, run_calibration
from .config import (
                  ActivationOnlyConfig,
                  BaseConfig,
                  DynamicConfig,
                  StaticConfig,
                  WeightOnlyConfig,
                  config_class,
)

__all__ = ["ActivationOnlyConfig", "BaseConfig", "DynamicConfig", "Quantizer", "StaticConfig",
           "WeightOnlyConfig", "config_class", "convert", "prepare", "quantize_model",
           "register_quantizer", "run_calibration"]
