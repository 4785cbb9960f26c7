"""Quantizing a checkpoint larger than memory: :func:`quantize_pretrained` reads a float
transformers checkpoint folder one block at a time, quantizes each block with the LLM
pipeline's own per-block step and writes the quantized checkpoint folder shard by shard
(resumable). Needs transformers (``qkern[hf]``); docs/streaming.md."""

from .activations import ActivationStore, batch_bytes
from .output import MANIFEST
from .run import StreamResult, quantize_pretrained

__all__ = ["MANIFEST", "ActivationStore", "StreamResult", "batch_bytes", "quantize_pretrained"]
