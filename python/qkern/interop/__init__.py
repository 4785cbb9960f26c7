"""Ways out and back in: ``qkern.export(model, out, format=...)`` writes a checkpoint another
runtime loads as it is; ``qkern.from_pretrained(path)`` loads any checkpoint qkern can run
(its own, GPTQ, AWQ, compressed-tensors, GGUF) onto qkern's kernels.

One module per format (``interop/<format>.py``) defines one :class:`Format` subclass with
``@register``: ``write`` (the export), and where qkern can import the format, ``detect`` and
``load``. ``_common.py`` holds what they share: the quantized layers of a model with their
codes (``QuantLinear.quantized_weight()``), the float tensors, atomic folder writes.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from torch import nn

__all__ = ["FORMATS", "Format", "export", "formats", "from_pretrained", "register"]

#: the format modules, imported when first asked for (their consumers are optional packages)
FORMATS = {"gptq": "gptq", "awq": "awq", "compressed-tensors": "compressed_tensors",
           "gguf": "gguf", "onnx": "onnx", "qkern": "qkern_folder"}


class Format:
    """One checkpoint format. ``name``: what ``format=`` takes."""

    name: str = ""

    def write(self, model: nn.Module, out: Path, **options) -> Path:
        """Writes ``model`` to ``out`` (a folder, or a file for single-file formats); returns
        the path written."""
        raise NotImplementedError(f"qkern cannot export format {self.name!r}")

    def detect(self, path: Path) -> bool:
        """Whether ``path`` holds a checkpoint of this format."""
        return False

    def load(self, path: Path, **options) -> nn.Module:
        """The model of the checkpoint at ``path`` on qkern's kernels."""
        raise NotImplementedError(f"qkern cannot import format {self.name!r}")


_REGISTERED: dict[str, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: adds a format (its ``name`` must be new)."""
    if not cls.name or cls.name in _REGISTERED:
        raise ValueError(f"format {cls.__name__}: name {cls.name!r} is empty or taken")
    _REGISTERED[cls.name] = cls()
    return cls


def _get(name: str) -> Format:
    if name not in _REGISTERED and name in FORMATS:
        try:
            importlib.import_module(f".{FORMATS[name]}", __name__)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(__name__):  # the format's module is not written
                raise ValueError(f"format {name!r} is not available in this qkern") from None
            raise
    if name not in _REGISTERED:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return _REGISTERED[name]


def formats() -> tuple[str, ...]:
    """The format names ``export`` and ``from_pretrained`` know."""
    return tuple(sorted(set(FORMATS) | set(_REGISTERED)))


def export(model: nn.Module, out: str | os.PathLike, format: str, **options) -> Path:
    """Writes the quantized ``model`` to ``out`` in ``format`` ("gptq", "awq",
    "compressed-tensors", "gguf", "onnx") for that format's own runtime; ``options`` are the
    format's (see docs/serving/<format>.md). Refuses, naming the layer and the reason, a model
    the format cannot hold exactly. Returns the path written."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(format, str):
        raise TypeError(f"format must be a string, got {type(format).__name__}")
    return _get(format).write(model, Path(out), **options)


def from_pretrained(path: str | os.PathLike, format: str | None = None, **options) -> nn.Module:
    """The checkpoint at ``path`` (a folder, or a ``.gguf`` file) on qkern's kernels: GPTQ,
    AWQ and compressed-tensors folders (their ``config.json`` ``quantization_config`` says
    which), GGUF files, and qkern's own. ``format`` skips the detection."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if format is not None:
        return _get(format).load(p, **options)
    tried = []
    for name in FORMATS:
        try:
            fmt = _get(name)
        except ValueError:
            continue
        tried.append(name)
        if fmt.detect(p):
            return fmt.load(p, **options)
    raise ValueError(f"{p}: not a checkpoint qkern can load (tried {', '.join(tried)})")
