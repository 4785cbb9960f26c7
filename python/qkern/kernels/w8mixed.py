"""LLM.int8's mixed 8/16-bit path (``act="int8_mixed"``): the int8 weights of the w8 kernels
(one scale per output channel, symmetric, midtread) on ``qkern::gemm_w8a8_mixed``: per-token
int8 activations over the input columns below the layer's ``outlier_threshold`` buffer, the
outlier columns in float against the same columns of the dequantized int8 weight
(ops/w8mixed.py)."""

from __future__ import annotations

import torch

from .base import register
from .w8 import W8a16

_OPS = torch.ops.qkern


@register
class W8a8Mixed(W8a16):
    names = ("w8a8_mixed",)
    acts = ("int8_mixed",)
    order = 64

    def matmul(self, name, x2, bufs, bias, n, k, q):
        return _OPS.gemm_w8a8_mixed(x2, bufs["w8_packed"], bufs["w8_scale"], bias, n, k,
                                    bufs["outlier_threshold"])
