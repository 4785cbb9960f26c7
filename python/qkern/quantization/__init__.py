"""The quantization workflow (README "Quantization workflow").

- :mod:`.registry`: configs (:class:`BaseConfig`, ``@config_class``), the :class:`Quantizer`
  base class and ``@register_quantizer``;
- :mod:`.calibration`: the public calibration toolkit (running batches, hooks, execution
  order, layer / block inputs, Gram matrices, layer-by-layer calibration);
- :mod:`.layers`: float layers -> quantized twins, observed inputs, activation quantizers;
- :mod:`.api`: ``prepare`` / ``convert`` / ``quantize_model``;
- :mod:`.algorithms`: one module per method (imported by discovery).
"""

from . import algorithms  # noqa: F401  (imports, and so registers, every algorithm)
from .algorithms.activation_only import ActivationOnlyConfig
from .algorithms.adaround import AdaRoundConfig
from .algorithms.bias_correction import bias_correction
from .algorithms.dynamic import DynamicConfig
from .algorithms.equalization import cross_layer_equalization
from .algorithms.llm_int8 import LLMInt8Config
from .algorithms.smoothquant import smooth_quant
from .algorithms.static import StaticConfig
from .algorithms.weight_only import WeightOnlyConfig
from .api import convert, prepare, quantize_model, run_calibration
from .calibration import (
    Gram,
    as_batches,
    call_model,
    capture_block_inputs,
    capture_inputs,
    collect_grams,
    execution_order,
    float_copy,
    input_rows,
    paired_moments,
    run_batches,
    sequential_calibration,
    weight_matrix,
)
from .layers import ActQuant, ObservedInput, ObservingQuantizer, weight_module
from .registry import (
    BaseConfig,
    Batch,
    Quantizer,
    config_class,
    quantizer_for,
    register_quantizer,
    registered_configs,
    registered_quantizers,
    replace_module,
)

__all__ = ["ActQuant", "ActivationOnlyConfig", "AdaRoundConfig", "BaseConfig", "Batch",
           "DynamicConfig", "Gram", "LLMInt8Config", "ObservedInput", "ObservingQuantizer",
           "Quantizer",
           "StaticConfig", "WeightOnlyConfig", "as_batches", "bias_correction", "call_model",
           "capture_block_inputs", "capture_inputs", "collect_grams", "config_class",
           "convert", "cross_layer_equalization", "execution_order", "float_copy",
           "input_rows", "paired_moments", "prepare", "quantize_model", "quantizer_for",
           "register_quantizer", "registered_configs", "registered_quantizers",
           "replace_module", "run_batches", "run_calibration", "sequential_calibration",
           "smooth_quant", "weight_matrix", "weight_module"]
