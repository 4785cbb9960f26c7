"""The one interface every vector / codebook quantizer of :mod:`qkern.vq` has (FAISS's shape:
train / encode / decode), and what they share: input conversion, checks, save / load.

A quantizer maps vectors of dimension ``d`` to integer codes and back::

    q = ProductQuantizer(d=64, m=8, nbits=8)
    q.train(x)                  # x: (n, d) numpy array or torch tensor, float
    codes = q.encode(x)         # (n, code_columns) integer numpy array
    x_hat = q.decode(codes)     # (n, d) float32 numpy array
    q.code_size_bits            # bits per vector (codes only), q.codebook_bits the rest
    q.save("pq.safetensors"); q2 = ProductQuantizer.load("pq.safetensors")

Inputs are converted with :func:`as_vectors` (float32, C-contiguous, 2-D, finite); outputs are
numpy arrays (``torch.from_numpy`` shares their memory). Subclasses set ``kind`` (the name
stored in files), implement ``_train``, ``_encode``, ``_decode``, ``code_size_bits``,
``state()`` (tensors) / ``config()`` (JSON-able constructor arguments) and ``_set_state``.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import numpy as np
import torch

from ..io.safetensors import read_safetensors, write_safetensors

__all__ = ["VQBase", "as_vectors", "as_codes", "NotTrainedError"]

_KINDS: dict[str, type[VQBase]] = {}


class NotTrainedError(RuntimeError):
    """encode / decode before train (or load)."""


def as_vectors(x: Any, d: int | None = None, name: str = "x") -> np.ndarray:
    """``x`` (numpy array, torch tensor or nested sequence) as a C-contiguous float32 (n, d)
    array; a 1-D input is one vector. Raises ValueError for another dimension, an empty or
    non-finite input, or a non-numeric dtype."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError(f"{name} must be real, got {x.dtype}")
        x = x.detach().to("cpu", torch.float32).numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (n, d) vectors, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if d is not None and a.shape[1] != d:
        raise ValueError(f"{name} has dimension {a.shape[1]}, the quantizer's is {d}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or Inf ({bad} of {a.shape[0]} vectors)")
    return a


def as_codes(codes: Any, columns: int, ksub: int | list[int], name: str = "codes") -> np.ndarray:
    """``codes`` as a C-contiguous int64 (n, columns) array, every column j in
    ``[0, ksub[j])`` (``ksub``: one bound for all columns or one per column)."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    c = np.asarray(codes)
    if c.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {c.dtype}")
    if c.ndim == 1 and columns == 1:
        c = c[:, None]
    if c.ndim != 2 or c.shape[1] != columns:
        raise ValueError(f"{name} must have shape (n, {columns}), got {c.shape}")
    c = np.ascontiguousarray(c, dtype=np.int64)
    hi = np.broadcast_to(np.asarray(ksub, dtype=np.int64), (columns,))
    if c.size and (c.min() < 0 or (c >= hi).any()):
        col = int(np.nonzero(((c < 0) | (c >= hi)).any(axis=0))[0][0])
        raise ValueError(f"{name} out of range: column {col} must lie in [0, {int(hi[col])}), "
                         f"got values in [{int(c[:, col].min())}, {int(c[:, col].max())}]")
    return c


class VQBase:
    """Base of every quantizer in :mod:`qkern.vq` (see the module docstring)."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            _KINDS[cls.kind] = cls

    def __init__(self, d: int):
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            raise ValueError(f"d must be a positive int, got {d!r}")
        self.d = d
        self.is_trained = False

    # ---- the interface ---------------------------------------------------------------
    def train(self, x: Any, **kw) -> VQBase:
        """Learns the codebooks from ``x`` (n, d); returns self."""
        self._train(as_vectors(x, self.d), **kw)
        self.is_trained = True
        return self

    def encode(self, x: Any) -> np.ndarray:
        self._require_trained("encode")
        return self._encode(as_vectors(x, self.d))

    def decode(self, codes: Any) -> np.ndarray:
        self._require_trained("decode")
        return self._decode(codes)

    def reconstruct(self, x: Any) -> np.ndarray:
        """decode(encode(x))."""
        return self.decode(self.encode(x))

    def mse(self, x: Any) -> float:
        """Mean squared reconstruction error per vector (summed over the d coordinates)."""
        a = as_vectors(x, self.d)
        return float(((self.reconstruct(a) - a) ** 2).sum(axis=1).mean())

    @property
    def code_size_bits(self) -> int:
        """Bits of one vector's code."""
        raise NotImplementedError

    @property
    def codebook_bits(self) -> int:
        """Bits of everything else decode needs (codebooks, rotations), stored as float32."""
        return 32 * sum(int(t.numel()) for t in self.state().values())

    # ---- for subclasses ----------------------------------------------------------------
    def _train(self, x: np.ndarray, **kw) -> None:
        raise NotImplementedError

    def _encode(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode(self, codes: Any) -> np.ndarray:
        raise NotImplementedError

    def config(self) -> dict:
        """The constructor's keyword arguments (JSON-able)."""
        return {"d": self.d}

    def state(self) -> dict[str, torch.Tensor]:
        """The learned tensors (empty before training)."""
        return {}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"{type(self).__name__}: unexpected tensors {sorted(tensors)}")

    def _require_trained(self, what: str) -> None:
        if not self.is_trained:
            raise NotTrainedError(f"{type(self).__name__}.{what}: train() (or load()) first")

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Writes the quantizer to a safetensors file (atomically): its tensors, and its kind
        and constructor arguments in the metadata."""
        self._require_trained("save")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state().items()}
        meta = {"qkern.vq.kind": self.kind, "qkern.vq.config": json.dumps(self.config())}
        write_safetensors(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VQBase:
        """Reads a file written by :meth:`save`; on a subclass, the file must hold that kind."""
        tensors, meta = read_safetensors(path, with_metadata=True)
        kind = meta.get("qkern.vq.kind")
        if kind not in _KINDS:
            raise ValueError(f"{os.fspath(path)}: not a qkern.vq file (kind {kind!r})")
        sub = _KINDS[kind]
        if cls is not VQBase and not issubclass(sub, cls):
            raise ValueError(f"{os.fspath(path)} holds a {sub.__name__}, not a {cls.__name__}")
        q = sub(**json.loads(meta["qkern.vq.config"]))
        q._set_state({k: v.clone() for k, v in tensors.items()})
        q.is_trained = True
        return q

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args}){'' if self.is_trained else ' (untrained)'}"
