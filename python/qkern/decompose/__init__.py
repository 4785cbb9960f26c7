"""Decomposition + quantization (docs/decompose.md).

- :mod:`.svd`: quantized SVD of Linear weights (:func:`quantized_svd`, rank from a size
  budget with :func:`rank_for_budget`; :func:`decompose_model` over a model);
- low-rank compensation of a quantized weight (LoRC, LQ-LoRA): the config
  :class:`~qkern.quantization.LowRankCompensationConfig` composing with any weight-only
  config, and :func:`compensate` on one layer (re-exported here);
- :mod:`.conv`: Tucker-2 and CP decompositions of Conv2d kernels into conv sequences, then
  quantization of the factors;
- quantized LoRA (QLoRA) is :mod:`qkern.lora`.
"""

from ..nn import CompensatedLinear, LowRankLinear, weight_bits
from ..quantization.algorithms.low_rank import (
    CompensationResult,
    LowRankCompensationConfig,
    compensate,
    compensate_model,
    svd_factors,
    weighted_svd_factors,
)
from .conv import (
    cp_als,
    cp_conv,
    cp_reconstruct,
    decompose_convs,
    quantize_factors,
    storage_bits,
    tucker2,
    tucker2_reconstruct,
    tucker_conv,
)
from .svd import decompose_model, factor_bits, quantized_svd, rank_for_budget

__all__ = ["CompensatedLinear", "CompensationResult", "LowRankCompensationConfig",
           "LowRankLinear", "compensate", "compensate_model", "cp_als", "cp_conv", "cp_reconstruct",
           "decompose_convs", "decompose_model", "factor_bits", "quantize_factors",
           "quantized_svd", "rank_for_budget", "storage_bits", "svd_factors", "tucker2",
           "tucker2_reconstruct", "tucker_conv", "weight_bits", "weighted_svd_factors"]
