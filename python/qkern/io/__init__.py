"""Files: safetensors reading and writing through the ``safetensors`` package
(:mod:`qkern.io.safetensors`), and ``qkern.save`` / ``qkern.load`` of converted models
(:mod:`qkern.io.serialization`, imported by ``qkern`` itself)."""

from .safetensors import atomic_write, read_safetensors, stale_temp_files, write_safetensors

__all__ = ["atomic_write", "read_safetensors", "stale_temp_files", "write_safetensors"]
