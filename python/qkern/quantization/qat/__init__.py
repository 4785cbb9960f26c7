"""Quantization-aware training: the fake quantizers, one module per method's rule (``ste``,
``lsq`` (LSQ and LSQ+), ``pact``), and the training modules ``prepare`` swaps in. The config
and its quantizer (``QATConfig``, prepare -> your training loop -> convert) live in
``quantization/algorithms/qat.py``."""

from .attention import AttentionQuant, bert_attention, register_transformers
from .base import Deployed, FakeQuant, int_format
from .lsq import LSQPlusQuant, LSQQuant, mse_range
from .modules import QATConv2d, QATLinear, fake_quantizers
from .pact import PACTQuant
from .ste import STEQuant

__all__ = ["AttentionQuant", "Deployed", "FakeQuant", "LSQPlusQuant", "LSQQuant", "PACTQuant",
           "QATConv2d", "QATLinear", "STEQuant", "bert_attention", "fake_quantizers",
           "int_format", "mse_range", "register_transformers"]
