"""Calibration data for the LLM methods: N samples x L tokens cut from a text.

``text_calibration(text, tokenizer, n_samples, seqlen)`` returns a list of (1, L) int64
token-id tensors (what ``quantize_model(..., calibration=)`` takes). ``tokenizer``: a
transformers tokenizer (anything with ``encode``), a callable text -> ids, or ``"bytes"``
for byte-level models such as models/wikitext-bytelm (token id = byte value).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

__all__ = ["byte_tokens", "text_calibration"]


def byte_tokens(text: str | bytes) -> list[int]:
    """UTF-8 bytes as token ids (the wikitext-bytelm's tokenizer)."""
    return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))


def _read(text) -> str | bytes:
    if isinstance(text, (str, bytes)) and not (isinstance(text, str) and os.path.isfile(text)):
        return text
    if isinstance(text, (str, os.PathLike)):
        with open(text, "rb") as f:
            raw = f.read()
        return raw
    raise TypeError(f"text must be a str, bytes or a file path, got {type(text).__name__}")


def _encode(data, tokenizer) -> list[int]:
    if tokenizer == "bytes":
        return byte_tokens(data)
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    if hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
        return list(getattr(ids, "ids", ids))
    if callable(tokenizer):
        return list(tokenizer(text))
    raise TypeError("tokenizer must be 'bytes', an object with encode(text) or a callable")


def text_calibration(text: str | bytes | os.PathLike, tokenizer: object | Callable = "bytes",
                     n_samples: int = 128, seqlen: int = 512, seed: int = 0
                     ) -> list[torch.Tensor]:
    """``n_samples`` windows of ``seqlen`` tokens from ``text`` (a string, bytes or a file
    path), non-overlapping, at random positions (``seed``), each a (1, seqlen) int64 tensor.
    Raises ValueError when the text holds fewer than ``n_samples * seqlen`` tokens."""
    for name, v in (("n_samples", n_samples), ("seqlen", seqlen)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    ids = _encode(_read(text), tokenizer)
    need = n_samples * seqlen
    if len(ids) < need:
        raise ValueError(f"the calibration text has {len(ids)} tokens; {n_samples} samples x "
                         f"{seqlen} tokens need {need}: pass more text, fewer samples or a "
                         "shorter seqlen")
    t = torch.tensor(ids, dtype=torch.int64)
    slots = len(ids) // seqlen
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(slots, generator=g)[:n_samples].sort().values
    return [t[int(k) * seqlen:(int(k) + 1) * seqlen].unsqueeze(0) for k in pick]
