"""Small reference models that qkern quantizes end to end (no transformers dependency)."""

from .llama import KVCache, Llama, LlamaConfig, bits_per_byte, load_llama

__all__ = ["KVCache", "Llama", "LlamaConfig", "bits_per_byte", "load_llama"]
