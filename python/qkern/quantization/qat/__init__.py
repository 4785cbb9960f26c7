"""Quantization-aware training: the fake quantizers, one module per method's rule (``ste``,
``lsq`` (LSQ and LSQ+), ``pact``, ``binary``: BinaryConnect / XNOR-Net / ABC-Net), and the
training modules ``prepare`` swaps in. The config and its quantizer (``QATConfig``, prepare ->
your training loop -> convert) live in ``quantization/algorithms/qat.py``."""

from .base import Deployed, FakeQuant, int_format
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
from .lsq import LSQPlusQuant, LSQQuant, mse_range
from .modules import QATConv2d, QATLinear, fake_quantizers
from .pact import PACTQuant
from .ste import STEQuant

__all__ = ["ABCInputQuant", "ABCWeightQuant", "BINARY_METHODS", "BinaryConnectQuant",
           "XNORConv2d", "XNORInputQuant", "XNORWeightQuant", "clip_latent_weights",
           "deploy_binary", "Deployed", "FakeQuant", "LSQPlusQuant", "LSQQuant", "PACTQuant",
           "QATConv2d", "QATLinear", "STEQuant", "fake_quantizers", "int_format", "mse_range"]
