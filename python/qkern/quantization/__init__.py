"""The quantization workflow (README "Quantization workflow").

- :mod:`.registry`: configs (:class:`BaseConfig`, ``@config_class``), the :class:`Quantizer`
  base class and ``@register_quantizer``;
- :mod:`.calibration`: the public calibration toolkit (running batches, hooks, execution
  order, layer / block inputs, Gram matrices, layer-by-layer calibration);
- :mod:`.layers`: float layers -> quantized twins, observed inputs, activation quantizers;
- :mod:`.api`: ``prepare`` / ``convert`` / ``quantize_model``;
- :mod:`.blocks` / :mod:`.sequential`: transformer blocks and the block-by-block pipeline of
  the LLM methods (:class:`SequentialQuantizer`); :mod:`.data`: calibration text -> samples;
- :mod:`.algorithms`: one module per method (imported by discovery).
"""

from . import algorithms  # noqa: F401  (imports, and so registers, every algorithm)
from .algorithms.activation_only import ActivationOnlyConfig
from .algorithms.adaround import AdaRoundConfig
from .algorithms.attention_int8 import QuantizedAttentionConfig
from .algorithms.awq import AWQConfig
from .algorithms.bias_correction import bias_correction
from .algorithms.dynamic import DynamicConfig
from .algorithms.dynamic_weight import DynamicWeightOnlyConfig
from .algorithms.equalization import cross_layer_equalization
from .algorithms.gptq import GPTQConfig
from .algorithms.hqq import HQQConfig, hqq_linear, hqq_quantize
from .algorithms.integer_only import IntegerOnlyConfig
from .algorithms.llm_int8 import LLMInt8Config, OutlierReport, outlier_report
from .algorithms.low_rank import LowRankCompensationConfig
from .algorithms.omniquant import OmniQuantConfig
from .algorithms.qat import (
    QATConfig,
    clip_latent_weights,
    inq_step,
    qat_regularization,
)
from .algorithms.rotation import RotationConfig, rotate_block, rotate_model
from .algorithms.round_aware import RoundAwareConfig, round_aware_finetune, round_on_grid
from .algorithms.rtn import RTNConfig
from .algorithms.smoothquant import SmoothQuantConfig, smooth_quant
from .algorithms.static import StaticConfig
from .algorithms.vq import VQConfig
from .algorithms.weight_only import WeightOnlyConfig
from .algorithms.zeroquant import ZeroQuantConfig
from .api import convert, notify_quantized, on_quantized, prepare, quantize_model, run_calibration
from .blocks import find_blocks, fold_scales, linearize_conv1d, scale_pairs
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
from .constraints import HardwareConstraints
from .data import byte_tokens, text_calibration
from .hardware import HardwareCost, hardware_cost
from .layers import ActQuant, ObservedInput, ObservingQuantizer, ParallelSum, weight_module
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
from .sequential import BlockContext, LayerReport, SequentialQuantizer, quantize_sequential

__all__ = ["AWQConfig", "ActQuant", "ActivationOnlyConfig", "AdaRoundConfig", "BaseConfig",
           "Batch", "BlockContext", "DynamicConfig", "DynamicWeightOnlyConfig", "GPTQConfig",
           "Gram", "HQQConfig", "HardwareConstraints", "HardwareCost", "IntegerOnlyConfig",
           "LLMInt8Config", "LayerReport", "LowRankCompensationConfig", "ObservedInput",
           "ObservingQuantizer", "OmniQuantConfig", "OutlierReport", "ParallelSum", "QATConfig",
           "Quantizer", "QuantizedAttentionConfig",
           "RTNConfig",
           "RotationConfig", "RoundAwareConfig", "round_aware_finetune", "round_on_grid",
           "SequentialQuantizer", "SmoothQuantConfig", "StaticConfig", "VQConfig",
           "WeightOnlyConfig",
           "ZeroQuantConfig", "as_batches", "bias_correction", "byte_tokens", "call_model",
           "capture_block_inputs", "capture_inputs", "collect_grams", "config_class", "convert",
           "cross_layer_equalization", "execution_order", "find_blocks", "float_copy",
           "fold_scales", "hardware_cost", "hqq_linear", "hqq_quantize", "inq_step", "input_rows",
           "linearize_conv1d", "outlier_report",
           "notify_quantized", "on_quantized", "paired_moments", "prepare", "qat_regularization",
           "clip_latent_weights", "quantize_model",
           "quantize_sequential", "quantizer_for",
           "register_quantizer", "registered_configs", "registered_quantizers", "replace_module",
           "rotate_block", "rotate_model", "run_batches", "run_calibration", "scale_pairs",
           "sequential_calibration", "smooth_quant", "text_calibration", "weight_matrix",
           "weight_module"]
