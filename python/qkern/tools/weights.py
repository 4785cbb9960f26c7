"""What a model's linear layers weigh in memory: the bytes a decode step reads."""

from __future__ import annotations

from torch import nn

from ..nn import QuantLinear
from ..vq.linear import VQLinear

__all__ = ["linear_weight_bytes", "quant_linear_bytes"]


def quant_linear_bytes(ql: QuantLinear) -> int:
    """Bytes of a QuantLinear's stored weights (packed codes, scales, zero points)."""
    return sum(t.numel() * t.element_size() for t in ql.packed_buffers().values())


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the (packed) weights of every linear layer: what one decode step reads."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += quant_linear_bytes(mod)
        elif isinstance(mod, VQLinear):  # codes as stored (uint8 / uint16), codebooks, scales
            total += sum(t.numel() * t.element_size() for t in (mod.codes, mod.codebooks,
                                                                 mod.scales) if t is not None)
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        elif hasattr(mod, "_packed_params") and hasattr(mod, "weight"):  # torch dynamic int8
            w = mod.weight()
            total += w.numel() + 4 * w.shape[0]  # int8 codes + a float32 scale per row
    return total
