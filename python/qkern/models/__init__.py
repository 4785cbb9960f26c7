"""Small reference models that qkern quantizes end to end (no transformers dependency)."""

from .hf import load_pretrained
from .llama import KVCache, Llama, LlamaConfig, bits_per_byte, load_llama

__all__ = ["KVCache", "Llama", "LlamaConfig", "bits_per_byte", "load_llama", "load_pretrained"]
