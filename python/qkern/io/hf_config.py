"""``qkern.load(path, config=...)``: the transformers architecture a config names, built with
no weights (parameters on the meta device, buffers real: :func:`~qkern.io.skeleton.empty_init`)
for the file's tensors to fill. Needs transformers (the optional ``qkern[hf]`` extra)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

from .skeleton import empty_init

__all__ = ["model_from_config"]


def model_from_config(config) -> nn.Module:
    """The model of ``config``: a transformers ``PretrainedConfig`` (its ``architectures``
    class, else ``AutoModelForCausalLM``) or a model folder holding its ``config.json``."""
    try:
        import transformers  # optional dependency
    except ImportError as e:
        raise ImportError("qkern.load(config=...) needs transformers: pip install "
                          "'qkern[hf]'") from e
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: not a model folder (no config.json)")
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    if not isinstance(config, transformers.PretrainedConfig):
        raise TypeError(f"config must be a transformers config or a model folder, got "
                        f"{type(config).__name__}")
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None)
    with empty_init(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()
