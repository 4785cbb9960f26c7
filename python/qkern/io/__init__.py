"""Files: safetensors reading and writing through the ``safetensors`` package
(:mod:`qkern.io.safetensors`), and ``qkern.save`` / ``qkern.load`` of converted models
(:mod:`qkern.io.serialization`, imported by ``qkern`` itself); sharded checkpoints
(:mod:`qkern.io.shards`); weight-free model building for loading (:mod:`qkern.io.skeleton`,
imported by ``qkern.io.serialization``)."""

from .safetensors import atomic_write, read_safetensors, stale_temp_files, write_safetensors
from .shards import checkpoint_files, read_checkpoint

__all__ = ["atomic_write", "checkpoint_files", "read_checkpoint", "read_safetensors",
           "stale_temp_files", "write_safetensors"]
