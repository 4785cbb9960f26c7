"""QLoRA: LoRA adapters over frozen quantized (e.g. NF4, double-quantized) base weights.

``apply_lora(model, LoRAConfig(...))`` wraps the target layers (every ``QuantLinear`` by
default) in :class:`LoRALinear`; the adapters train with gradients flowing through the quantized
base (``qkern.ops.autograd``), which stays packed and frozen. ``merge_lora`` folds them into a
float or re-quantized model; ``save_adapters`` / ``load_adapters`` keep them in their own
safetensors file; ``register_peft`` makes ``QuantLinear`` a target of peft's LoRA. See
docs/qlora.md.
"""

from .files import ADAPTER_FORMAT, load_adapters, save_adapters
from .layer import LoRAConfig, LoRALinear, apply_lora, lora_layers, merge_lora
from .peft_layer import peft_layer_class, register_peft

__all__ = ["ADAPTER_FORMAT", "LoRAConfig", "LoRALinear", "apply_lora", "load_adapters",
           "lora_layers", "merge_lora", "peft_layer_class", "register_peft", "save_adapters"]
