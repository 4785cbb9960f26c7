"""qkern's own checkpoint folder: what ``save_pretrained`` of a qkern-quantized transformers
model writes (``config.json`` with a qkern ``quantization_config``, ``model.safetensors`` (or
shards plus ``model.safetensors.index.json``) holding the float tensors and every quantized
layer's packed buffers under the layer's name), loaded back by ``transformers``'
``from_pretrained`` once ``qkern`` is imported, and by ``qkern.from_pretrained``.

``qkern.export(model, out, format="qkern")`` writes it atomically from a transformers model or
from qkern's own ``models.Llama`` (its names are transformers' ``LlamaForCausalLM``'s, so the
folder loads as one). Options: ``overwrite`` (replace an existing folder), ``max_shard_size``
(transformers' shard size, e.g. ``"200MB"``; transformers models only).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from ..hf import QkernConfig, QkernHfQuantizer, attach
from ..io.serialization import layer_specs
from ..models import Llama, load_pretrained
from . import Format, register
from ._common import write_folder, write_json, write_tensors
from .hf_quantizer import read_quant_method, saving_problems

__all__ = ["QkernFolder", "llama_hf_config"]


def llama_hf_config(model: Llama) -> dict:
    """transformers' ``LlamaConfig`` dict of qkern's :class:`~qkern.models.Llama`."""
    c = model.config
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": c.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "dtype": "float32", "bos_token_id": None, "eos_token_id": None,
            "pad_token_id": None}


def _refuse(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError("qkern export: the model would not load back from the folder:\n  "
                         + "\n  ".join(problems[:8]) + more)


def _write_llama(model: Llama, tmp: Path) -> None:
    d = llama_hf_config(model)
    specs = layer_specs(model)
    if {"lm_head", "model.embed_tokens"} & set(specs):
        d["tie_word_embeddings"] = False  # each holds its own codes now
    with torch.device("meta"):
        fresh = transformers.LlamaForCausalLM(transformers.LlamaConfig(**d))
    state = {k: v for k, v in model.state_dict().items() if v is not None}
    if d["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    _refuse(saving_problems(model, fresh, state))
    cfg = QkernConfig(getattr(model, "qkern_config", None), layers=specs)
    write_json(tmp / "config.json", {**d, "quantization_config": cfg.to_dict(),
                                     "transformers_version": transformers.__version__})
    write_tensors(tmp / "model.safetensors", {k: v.contiguous() for k, v in state.items()})


@register
class QkernFolder(Format):
    name = "qkern"

    def write(self, model: nn.Module, out: Path, overwrite: bool = False,
              max_shard_size: str | int | None = None) -> Path:
        if not layer_specs(model):
            raise ValueError("qkern export: the model has no quantized layers; quantize it "
                             "first (qkern.quantize_model)")
        if isinstance(model, Llama):
            if max_shard_size is not None:
                raise ValueError("max_shard_size applies to transformers models; qkern's Llama "
                                 "is written as one model.safetensors")
            return write_folder(out, lambda tmp: _write_llama(model, tmp), overwrite)
        if not isinstance(model, transformers.PreTrainedModel):
            raise TypeError(f"qkern export writes transformers models and qkern's Llama, got "
                            f"{type(model).__name__} (qkern.save writes any model)")
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        attached = isinstance(getattr(model, "hf_quantizer", None), QkernHfQuantizer)
        names = ("hf_quantizer", "is_quantized", "quantization_method")
        before = {k: model.__dict__[k] for k in names if k in model.__dict__}
        before_cfg = model.config.__dict__.get("quantization_config")

        def fill(tmp: Path) -> None:
            try:
                if not attached:  # for this save only: the user's model is left as it was
                    attach(model)
                model.save_pretrained(tmp, **kw)
            finally:
                if not attached:
                    for k in names:
                        model.__dict__.pop(k, None)
                    model.__dict__.update(before)
                    if before_cfg is None:
                        model.config.__dict__.pop("quantization_config", None)
                    else:
                        model.config.quantization_config = before_cfg

        return write_folder(out, fill, overwrite)

    def detect(self, path: Path) -> bool:
        return path.is_dir() and read_quant_method(path) == "qkern"

    def load(self, path: Path, **options) -> nn.Module:
        """The model of a qkern folder through transformers' ``from_pretrained`` (float32
        unless ``dtype=`` says otherwise; ``options`` go to ``from_pretrained``)."""
        if not self.detect(path):
            raise ValueError(f"{path}: not a qkern checkpoint folder (its config.json has no "
                             "quantization_config with quant_method 'qkern')")
        return load_pretrained(path, **options)
