"""qkern's QuantLinear as a target of peft's LoRA (``pip install peft``; tested with 0.21.2).

peft has no dispatcher for qkern's layers, so :func:`register_peft` adds one through peft's
custom-module mapping (``LoraConfig._register_custom_module``, documented in peft's "Custom
models" guide): ``QuantLinear`` -> :func:`peft_layer_class`, a ``LoraLayer`` computing
``base(x) + lora_B(lora_A(dropout(x))) * scaling`` with the frozen quantized base, like peft's
own bitsandbytes ``Linear4bit``. Plain LoRA only (no DoRA, aLoRA, Arrow, VeLoRA, mixed adapter
batches). ``merge`` / ``merge_and_unload`` re-quantize ``W + B A * scaling`` in the base's
format and layout (lossy, as for bitsandbytes); ``qkern.lora.merge_lora`` is the float merge.
peft is imported only when these functions run.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..nn import QuantLinear
from .layer import quantized_like

__all__ = ["peft_layer_class", "register_peft"]

_CLASS: list[type] = []


def _import_peft():
    try:
        import peft  # optional: only for peft users
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import check_adapters_to_merge
    except ImportError as e:
        raise ImportError("qkern.lora's peft support needs peft: pip install peft") from e
    return peft, LoraLayer, check_adapters_to_merge


def _requantized(base: QuantLinear, w: torch.Tensor) -> QuantLinear:
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
    return quantized_like(base, lin, base.weight_q.format.name)


def peft_layer_class() -> type:
    """peft's LoRA layer for a qkern ``QuantLinear`` (built on first use)."""
    if _CLASS:
        return _CLASS[0]
    _, LoraLayer, check_adapters_to_merge = _import_peft()

    class QuantLinearLoRA(nn.Module, LoraLayer):
        """peft LoRA over a frozen qkern QuantLinear."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0,
                     lora_alpha: int = 1, **kwargs) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def resolve_lora_variant(self, *, config, **kwargs):
            if (config.use_dora or getattr(config, "alora_invocation_tokens", None) is not None
                    or getattr(config, "arrow_config", None) is not None
                    or getattr(config, "velora_config", None) is not None):
                raise ValueError("qkern QuantLinear under peft supports plain LoRA only (no "
                                 "DoRA, aLoRA, Arrow or VeLoRA)")
            return None

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight
                    ) * self.scaling[adapter]

        def _swap_base(self, sign: float, adapters: list[str], safe: bool) -> None:
            holder = self
            while hasattr(holder.base_layer, "base_layer"):
                holder = holder.base_layer
            base = holder.base_layer
            w = base.dequantize_weight()
            for a in adapters:
                w = w + sign * self.get_delta_weight(a).detach().float()
            if safe and not bool(torch.isfinite(w).all()):
                raise ValueError(f"NaNs or infs in the merged weight of adapters {adapters}")
            warnings.warn("merging LoRA into a quantized qkern layer re-quantizes the weight "
                          "(rounding error); qkern.lora.merge_lora gives a float merge",
                          UserWarning, stacklevel=3)
            holder.base_layer = _requantized(base, w)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            names = [a for a in check_adapters_to_merge(self, adapter_names)
                     if a in self.lora_A]
            if names:
                self._swap_base(1.0, names, safe_merge)
                self.merged_adapters.extend(names)

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
                return
            names = [a for a in self.merged_adapters if a in self.lora_A]
            self.merged_adapters.clear()
            if names:
                self._swap_base(-1.0, names, False)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            if kwargs.pop("adapter_names", None) is not None:
                raise ValueError("qkern QuantLinear under peft: adapter_names (mixed adapter "
                                 "batches) is not supported")
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            if self.merged:
                return result
            for a in self.active_adapters:
                if a not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[a], self.lora_B[a]
                h = self._cast_input_dtype(x, lora_a.weight.dtype)
                out = lora_b(lora_a(self.lora_dropout[a](h))) * self.scaling[a]
                result = result + out.to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    _CLASS.append(QuantLinearLoRA)
    return QuantLinearLoRA


def register_peft(config):
    """Registers qkern's ``QuantLinear`` with a ``peft.LoraConfig`` (in place; returns it), so
    that ``peft.get_peft_model(model, config)`` puts LoRA on a qkern-quantized model.

    >>> import peft, torch, qkern
    >>> from qkern.lora import register_peft
    >>> q = qkern.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)),
    ...                          qkern.WeightOnlyConfig(fmt="nf4", group_size=64))
    >>> cfg = register_peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    >>> pm = peft.get_peft_model(q, cfg)
    >>> pm.get_nb_trainable_parameters()
    (512, 576)
    """
    peft, _, _ = _import_peft()
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: peft_layer_class()})
    return config
