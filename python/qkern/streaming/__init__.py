"""Quantizing a checkpoint larger than memory: :func:`quantize_pretrained` reads a float
transformers checkpoint folder one block at a time, quantizes each block with the LLM
pipeline's own per-block step and writes the quantized checkpoint folder shard by shard
(resumable). Needs transformers (``qkern[hf]``); docs/streaming.md.

``quantize_pretrained``, ``StreamResult`` and ``skeleton`` (which need transformers) are
imported on first use, so ``qkern.streaming.output`` (the folder's layout, :func:`run_state`)
costs no transformers import."""

import importlib

from .activations import ActivationStore, batch_bytes
from .output import MANIFEST, run_state

__all__ = ["MANIFEST", "ActivationStore", "StreamResult", "batch_bytes", "quantize_pretrained",
           "run_state", "skeleton"]

_LAZY = {"quantize_pretrained": ".run", "StreamResult": ".run", "skeleton": ".checkpoint"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'qkern.streaming' has no attribute {name!r}")
