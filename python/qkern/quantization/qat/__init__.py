"""Quantization-aware training: the fake quantizers, one module per method's rule (``ste``,
``lsq`` (LSQ and LSQ+), ``pact``, ``relaxed``, ``dorefa``, ``ttq``, ``inq``, ``binary``:
BinaryConnect / XNOR-Net / ABC-Net), and the training modules ``prepare`` swaps in. The config
and its quantizer (``QATConfig``, prepare -> your training loop -> convert) live in
``quantization/algorithms/qat.py``; :func:`inq_step` advances INQ's partition schedule between
training phases, :func:`clip_latent_weights` is BinaryConnect's clip after each step."""

from .attention import AttentionQuant, attach_attention, qkern_attention, register_transformers
from .base import (
    ConvertedModelTrainingWarning,
    Deployed,
    FakeQuant,
    frozen_after_convert,
    int_format,
    quantized_layers,
    refuse_converted,
)
from .binary import (
    BINARY_METHODS,
    ABCInputQuant,
    ABCWeightQuant,
    BinaryConnectQuant,
    XNORConv2d,
    XNORInputQuant,
    XNORWeightQuant,
    clip_latent_weights,
    deploy_binary,
)
from .dorefa import (
    DoReFaActQuant,
    DoReFaGradQuant,
    DoReFaWeightQuant,
    dorefa_quantize_grad,
    midrise_qtensor,
)
from .inq import INQQuant, inq_step, pow2_quantize
from .lsq import LSQPlusQuant, LSQQuant, mse_range, mse_scale
from .modules import QATConv2d, QATLinear, fake_quantizers, float_twin
from .pact import PACTQuant
from .relaxed import RelaxedQuant
from .ste import STEQuant
from .token import TokenQuant
from .ttq import TTQQuant

__all__ = ["ABCInputQuant", "ABCWeightQuant", "AttentionQuant", "BINARY_METHODS",
           "attach_attention", "BinaryConnectQuant", "ConvertedModelTrainingWarning", "Deployed",
           "DoReFaActQuant", "DoReFaGradQuant",
           "DoReFaWeightQuant", "FakeQuant", "INQQuant", "LSQPlusQuant", "LSQQuant", "PACTQuant",
           "QATConv2d", "QATLinear", "RelaxedQuant", "STEQuant", "TTQQuant", "TokenQuant",
           "XNORConv2d",
           "XNORInputQuant", "XNORWeightQuant", "clip_latent_weights", "deploy_binary",
           "dorefa_quantize_grad", "fake_quantizers", "float_twin", "frozen_after_convert",
           "inq_step", "int_format", "midrise_qtensor", "mse_range", "mse_scale",
           "pow2_quantize", "qkern_attention", "quantized_layers", "refuse_converted",
           "register_transformers"]
