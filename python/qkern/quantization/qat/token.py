"""Per-token dynamic int8 activations for QAT (``QATConfig(act_granularity="token")``): each
row of the input (one token: the last dim) gets the scale ``max_k |x[m, k]| / 127`` at run
time (0 -> 1), codes ``clamp(round(x / s), -127, 127)``: the rule of QuantLinear's
``act="int8_token"`` (qkern.kernels.token_int8), which ``convert`` deploys it as. No learned
parameter; the straight-through gradient passes unchanged (nothing is clipped: the scale
covers the row's max)."""

from __future__ import annotations

import torch

from ...kernels.token_int8 import per_token_int8
from .base import Deployed, FakeQuant

__all__ = ["TokenQuant"]


class TokenQuant(FakeQuant):
    """Symmetric int8, one scale per token computed from the token itself."""

    KIND = "token"

    def __init__(self, name: str = ""):
        super().__init__(8, True, None, name)
        self.initialized.fill_(True)  # nothing to learn or calibrate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            raise ValueError(f"{self.where()}: per-token quantization needs an input with a "
                             "feature dimension, got a 0-d tensor")
        y = per_token_int8(x.reshape(-1, x.shape[-1]).float())
        return y.reshape(x.shape).to(x.dtype)

    def deploy(self) -> Deployed:
        return Deployed("int8", torch.ones(()), None, None, granularity="token")

    def extra_repr(self) -> str:
        return "bits=8, signed, per token (dynamic)"
