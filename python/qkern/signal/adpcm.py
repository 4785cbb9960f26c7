r"""IMA-ADPCM (4 bits per 16-bit sample) on the C++ coder (csrc/cpu/signal), bit-exact with
Python's ``audioop.lin2adpcm`` / ``audioop.adpcm2lin`` (the IMA 1992 step and index tables).

A stream's state is ``(valprev, index)``: the last reconstructed sample (-32768..32767) and the
step-table position (0..88); ``None`` is ``(0, 0)``, audioop's start. Coding a stream in pieces,
each call starting from the state the previous one returned, gives the codes of one call.

Codes come unpacked (one code 0..15 per uint8) or, with ``packed=True``, two per byte with the
FIRST sample in the HIGH nibble (audioop's order; ``qkern.pack_bits(codes, 4, order="msb")``).
For an odd number of samples the last byte holds the last code in its high nibble and 0 below;
audioop drops that last code from its output (its bytes are ours without the last byte) but
its state includes it.

Several independent streams: ``pcm`` of shape (channels, n) with ``state`` an int array
(channels, 2) (or a list of pairs); the channels are coded in parallel.

>>> import numpy as np
>>> pcm = (1000 * np.sin(np.arange(8) / 2)).astype(np.int16)
>>> codes, st = ima_adpcm_encode(pcm)
>>> codes.tolist(), st
([0, 7, 7, 7, 7, 7, 12, 12], (-305, 44))
>>> ima_adpcm_decode(codes, 8)[0].tolist()
[0, 11, 41, 104, 240, 533, 154, -305]
>>> ima_adpcm_encode(pcm, packed=True)[0].tobytes()  # audioop.lin2adpcm(pcm.tobytes(), 2, None)
b'\x07ww\xcc'
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import _C
from ..packing import pack_bits, unpack_bits

__all__ = ["ima_adpcm_decode", "ima_adpcm_encode"]


def _states(state: Any, channels: int, one: bool, fn: str) -> np.ndarray:
    """state -> int32 (channels, 2), checked."""
    if state is None:
        return np.zeros((channels, 2), np.int32)
    if one:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{fn}: state must be a (valprev, index) pair or None, got {state!r}")
        state = [state]
    try:
        arr = np.asarray(state)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn}: state must be (valprev, index) pairs, got {state!r}") from e
    if arr.shape != (channels, 2) or arr.dtype.kind not in "iu":
        raise TypeError(f"{fn}: state must be {channels} integer (valprev, index) pairs, got "
                        f"{state!r}")
    if ((arr[:, 0] < -32768) | (arr[:, 0] > 32767)).any():
        raise ValueError(f"{fn}: state valprev must lie in -32768..32767, got {arr[:, 0]}")
    if ((arr[:, 1] < 0) | (arr[:, 1] > 88)).any():
        raise ValueError(f"{fn}: state index must lie in 0..88, got {arr[:, 1]}")
    return np.ascontiguousarray(arr, np.int32)


def _out_state(st: np.ndarray, one: bool):
    return (int(st[0, 0]), int(st[0, 1])) if one else st


def _numpy(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if isinstance(a, np.ndarray):
        return a
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")


def ima_adpcm_encode(pcm, state=None, *, packed: bool = False):
    """int16 PCM (n,) or (channels, n) -> ``(codes, state)``: uint8 codes 0..15 of the same
    shape (``packed``: (..., ceil(n / 2)) bytes, first sample in the high nibble) and the state
    after the last sample (a pair for one stream, int32 (channels, 2) for several)."""
    a = _numpy(pcm, "pcm")
    if a.dtype != np.int16:
        raise TypeError(f"ima_adpcm_encode: pcm must be int16 (16-bit PCM), got {a.dtype}")
    if a.ndim not in (1, 2):
        raise ValueError(f"ima_adpcm_encode: pcm must be (n,) or (channels, n), got {a.shape}")
    one = a.ndim == 1
    a2 = np.ascontiguousarray(a.reshape(1, -1) if one else a)
    st = _states(state, a2.shape[0], one, "ima_adpcm_encode")
    codes = np.empty(a2.shape, np.uint8)
    _C.ima_adpcm_encode_raw(a2.ctypes.data, a2.shape[0], a2.shape[1], codes.ctypes.data,
                            st.ctypes.data)
    if packed:
        codes = np.stack([pack_bits(row, 4, order="msb") for row in codes]) if len(codes) \
            else np.zeros((0, 0), np.uint8)
    return (codes[0] if one else codes), _out_state(st, one)


def ima_adpcm_decode(codes, n: int, state=None, *, packed: bool | None = None):
    """Codes (from ``ima_adpcm_encode``) -> ``(pcm, state)``: int16 (n,) or (channels, n).
    ``codes``: unpacked uint8 (..., n) or packed bytes (..., ceil(n / 2)); ``packed=None``
    decides by type and length (``bytes`` / ``bytearray`` are packed; an array of length n is
    unpacked, of length ceil(n / 2) packed)."""
    if isinstance(codes, (bytes, bytearray)):
        codes = np.frombuffer(bytes(codes), np.uint8).copy()
        packed = True if packed is None else packed
    a = _numpy(codes, "codes")
    if a.dtype != np.uint8:
        raise TypeError(f"ima_adpcm_decode: codes must be uint8, got {a.dtype}")
    if a.ndim not in (1, 2):
        raise ValueError(f"ima_adpcm_decode: codes must be 1-D or (channels, m), got {a.shape}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise TypeError(f"ima_adpcm_decode: n must be a non-negative int, got {n!r}")
    n = int(n)
    one = a.ndim == 1
    a2 = a.reshape(1, -1) if one else a
    if packed is None:
        packed = a2.shape[1] != n
    want = (n + 1) // 2 if packed else n
    if a2.shape[1] != want:
        what = "packed bytes" if packed else "codes"
        raise ValueError(f"ima_adpcm_decode: {n} samples need {want} {what} per channel, got "
                         f"{a2.shape[1]}")
    if packed:
        a2 = np.stack([unpack_bits(row, 4, n, order="msb") for row in a2]) if len(a2) \
            else np.zeros((0, n), np.uint8)
    elif (a2 > 15).any():
        raise ValueError("ima_adpcm_decode: unpacked codes must lie in 0..15")
    a2 = np.ascontiguousarray(a2, np.uint8)
    st = _states(state, a2.shape[0], one, "ima_adpcm_decode")
    pcm = np.empty(a2.shape, np.int16)
    _C.ima_adpcm_decode_raw(a2.ctypes.data, a2.shape[0], n, pcm.ctypes.data, st.ctypes.data)
    return (pcm[0] if one else pcm), _out_state(st, one)
