"""Local Hugging Face model folders through transformers (the optional ``qkern[hf]`` extra):
nothing is fetched from a hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_pretrained"]


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                    **kwargs) -> nn.Module:
    """The transformers model saved in the local folder ``path`` (its ``config.json``
    ``architectures`` decides the class: ``*ForCausalLM`` and encoders such as ``BertModel``),
    in eval mode. One ``model.safetensors`` or shards with ``model.safetensors.index.json``;
    float16 / bfloat16 checkpoints are converted to ``dtype`` (float32 by default: exact;
    ``"auto"`` keeps the checkpoint's). ``kwargs`` go to ``from_pretrained`` (e.g.
    ``quantization_config=qkern.hf.QkernConfig(...)``). Needs ``pip install qkern[hf]``."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: not a model folder (no config.json)")
    try:
        import transformers  # optional dependency, imported only when a folder is given
    except ImportError as e:
        raise ImportError("loading a model folder needs transformers: pip install "
                          "'qkern[hf]'") from e
    arch = (json.loads((p / "config.json").read_text()).get("architectures") or [""])[0]
    cls = getattr(transformers, arch, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModelForCausalLM
    model = cls.from_pretrained(str(p), dtype=dtype, local_files_only=True, **kwargs)
    return model.eval()
