"""Predictive and differential coding of signals (``qkern.signal``, docs/signal.md): IMA-ADPCM
bit-exact with ``audioop``, delta modulation / delta quantization, closed-loop DPCM with a
least-squares predictor, and tensor streams (a KV cache along time) compressed with them.
The coders run in C++ (csrc/cpu/signal)."""

from __future__ import annotations

from .adpcm import ima_adpcm_decode, ima_adpcm_encode
from .dpcm import DPCMCode, delta_decode, delta_encode, dpcm_decode, dpcm_encode, fit_predictor
from .stream import CompressedStream, compress_stream, sqnr, uniform_baseline

__all__ = ["CompressedStream", "DPCMCode", "compress_stream", "delta_decode", "delta_encode",
           "dpcm_decode", "dpcm_encode", "fit_predictor", "ima_adpcm_decode", "ima_adpcm_encode",
           "sqnr", "uniform_baseline"]
