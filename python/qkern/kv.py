"""A quantized key/value cache for transformers models (``qkern.kv``), KIVI-style (Liu et al.
2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

Keys are quantized **per channel**: for every (batch, head, channel) the codes share a scale
(and zero point) over a group of ``group_size`` consecutive tokens. Values are quantized **per
token**: groups of ``value_group_size`` consecutive channels of the head dimension. The
``residual`` most recent tokens stay in full precision; whenever the float window holds more,
the oldest whole multiple of ``group_size`` tokens beyond ``residual`` is quantized and
appended to the quantized storage (so the window holds between ``residual`` and
``residual + group_size - 1`` tokens once the sequence is long enough). Quantized chunks are
never re-quantized.

Formats: ``bits=8, fmt="int"`` (int8 codes), ``bits=4, fmt="int"`` (int4, two codes per byte
in memory: ``qkern.pack_bits`` along the head dimension), ``bits=8, fmt="fp8"`` (FP8 E4M3,
held as ``torch.float8_e4m3fn``). Integer formats are asymmetric by default (KIVI), int8 zero
points; FP8 is symmetric. Scales are float32. The rounding is qkern's own
(``qkern.quantize`` / ``dequantize``, docs/numerics.md).

Attention in a forward sees the past as the cache holds it (dequantized storage + the float
window) and the states of the tokens of that same forward exactly; those are stored
afterwards (transformers' ``QuantizedCache`` does the same).

Example::

    >>> import torch, qkern
    >>> from qkern.models import load_pretrained
    >>> from qkern.models.assets import shipped_path
    >>> model = load_pretrained(shipped_path("models/wikitext-bytelm"))
    >>> cache = qkern.kv.QuantizedKVCache(bits=4, group_size=32, residual=32)
    >>> prompt = torch.tensor([list(b"The history of the ")])
    >>> out = model.generate(prompt, past_key_values=cache, max_new_tokens=64, do_sample=False)
    >>> cache.get_seq_length()      # 19 prompt bytes + 63 fed back (the 64th is not)
    82
    >>> cache.nbytes() < 82 * 4 * 2 * 8 * 32 * 4     # fp32 keys + values of 4 layers
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import formats as F
from .layout import Layout
from .packing import pack_bits
from .quantize import quantize
from .tensor import PackedQTensor, QTensor, dequantize

FORMATS = {("int", 8): "int8", ("int", 4): "int4", ("fp8", 8): "fp8_e4m3"}
TOKEN_AXIS, CHANNEL_AXIS = 2, 3  # of the (batch, heads, tokens, head_dim) states


def _positive_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class KVSpec:
    """The checked settings of a :class:`QuantizedKVCache`."""

    bits: int = 4
    fmt: str = "int"
    group_size: int = 64
    residual: int = 128
    symmetric: bool = False
    value_group_size: int | None = None

    def __post_init__(self):
        if self.fmt not in ("int", "fp8"):
            raise ValueError(f"fmt must be 'int' or 'fp8', got {self.fmt!r}")
        if self.bits not in (4, 8) or (self.fmt, self.bits) not in FORMATS:
            raise ValueError(f"bits={self.bits!r} with fmt={self.fmt!r} is not supported; choose "
                             "bits=8 or bits=4 with fmt='int', or bits=8 with fmt='fp8'")
        _positive_int("group_size", self.group_size, 1)
        _positive_int("residual", self.residual, 0)
        if self.value_group_size is not None:
            _positive_int("value_group_size", self.value_group_size, 1)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(self.symmetric).__name__}")
        if self.fmt == "fp8" and not self.symmetric:
            raise ValueError("fmt='fp8' is symmetric only: pass symmetric=True (or leave it None)")

    @property
    def format(self) -> F.Format:
        return F.get(FORMATS[(self.fmt, self.bits)])

    def value_group(self, head_dim: int) -> int:
        """Channels per value group: ``value_group_size``, else ``min(group_size, head_dim)``."""
        g = self.value_group_size or min(self.group_size, head_dim)
        if head_dim % g:
            raise ValueError(f"value group size {g} does not divide the head dimension "
                             f"{head_dim} (values are quantized per token in groups of channels)")
        return g


class QuantStore:
    """The quantized storage of one layer's keys or values, (batch, heads, tokens, head_dim):
    codes (int8, two int4 codes per uint8 byte, or float8_e4m3fn), float32 scales and int8 zero
    points, each concatenated along the token axis as chunks are appended. ``axis`` is the axis
    along which a group runs (2: tokens, the keys; 3: channels, the values)."""

    def __init__(self, spec: KVSpec, axis: int, group: int):
        self.fmt, self.symmetric, self.axis, self.group = spec.format, spec.symmetric, axis, group
        self.codes = self.scale = self.zero = None
        self.dims: tuple[int, int, int] | None = None  # batch, heads, head_dim

    @property
    def length(self) -> int:
        return 0 if self.scale is None else self.codes.shape[TOKEN_AXIS]

    def append(self, x: torch.Tensor) -> None:
        b, h, n, d = x.shape
        q = quantize(x.detach(), self.fmt, granularity="group", axis=self.axis,
                     group_size=self.group, symmetric=self.symmetric)
        codes = q.codes
        if self.fmt.bits == 4:  # LSB-first pairs along the head dimension: (d even, d odd)
            codes = pack_bits(codes.contiguous(), 4).view(b, h, n, d // 2)
        elif self.fmt.kind == "codebook":
            codes = codes.view(torch.float8_e4m3fn)
        zero = None if q.zero_point is None else q.zero_point.to(torch.int8)
        if self.scale is None:
            self.codes, self.scale, self.zero, self.dims = codes, q.scale, zero, (b, h, d)
            return
        self.codes = torch.cat([self.codes, codes], dim=TOKEN_AXIS)
        self.scale = torch.cat([self.scale, q.scale], dim=TOKEN_AXIS)
        if zero is not None:
            self.zero = torch.cat([self.zero, zero], dim=TOKEN_AXIS)

    def qtensor(self, dtype: torch.dtype = torch.float32) -> QTensor:
        """The storage as one QTensor (codes unpacked, one int8 / uint8 per element)."""
        b, h, d = self.dims
        layout = Layout("group", (b, h, self.length, d), self.axis, self.group)
        zero = None if self.zero is None else self.zero.to(torch.int32)
        meta = QTensor(None, self.scale, zero, self.fmt, layout, dtype)
        if self.fmt.bits == 4:
            return PackedQTensor(self.codes.reshape(-1), meta).unpack()
        codes = self.codes.view(torch.uint8) if self.fmt.kind == "codebook" else self.codes
        return replace(meta, codes=codes)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qtensor(dtype))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]

    def nbytes(self) -> dict[str, int]:
        def size(t):
            return 0 if t is None else t.numel() * t.element_size()
        return {"codes": size(self.codes), "scales": size(self.scale),
                "zero_points": size(self.zero)}

    def apply(self, fn) -> None:
        """``fn`` (a batch reordering / selection) on every held tensor."""
        if self.scale is not None:
            self.codes, self.scale = fn(self.codes), fn(self.scale)
            self.zero = None if self.zero is None else fn(self.zero)
            self.dims = (self.codes.shape[0],) + self.dims[1:]


class QuantizedKVLayer(DynamicLayer):
    """One attention layer of a :class:`QuantizedKVCache`: the float window in ``keys`` /
    ``values`` (as transformers' DynamicLayer), the quantized past in ``qkeys`` / ``qvalues``
    (:class:`QuantStore`)."""

    is_croppable = False

    def __init__(self, spec: KVSpec):
        super().__init__()
        self.spec = spec
        self.cumulative_length = 0
        self.qkeys: QuantStore | None = None
        self.qvalues: QuantStore | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if t.dim() != 4 or not t.is_floating_point():
                raise ValueError(f"{name} must be a float (batch, heads, tokens, head_dim) "
                                 f"tensor, got {t.dtype} of shape {tuple(t.shape)}")
        if self.spec.bits == 4 and (key_states.shape[-1] % 2 or value_states.shape[-1] % 2):
            raise ValueError("bits=4 packs two codes per byte along the head dimension, which "
                             f"must be even; got {key_states.shape[-1]}, {value_states.shape[-1]}")
        vgroup = self.spec.value_group(value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(key_states.shape[:2] + (0, key_states.shape[-1]))
        self.values = value_states.new_empty(value_states.shape[:2] + (0, value_states.shape[-1]))
        self.qkeys = QuantStore(self.spec, TOKEN_AXIS, self.spec.group_size)
        self.qvalues = QuantStore(self.spec, CHANNEL_AXIS, vgroup)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new states; returns the past as held (quantized part dequantized, then the
        float window) followed by the new states, exact."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old_k, old_v = [self.keys], [self.values]
        if self.qkeys.length:
            old_k.insert(0, self.qkeys.dequantize(self.dtype))
            old_v.insert(0, self.qvalues.dequantize(self.dtype))
        keys = torch.cat(old_k + [key_states], dim=TOKEN_AXIS)
        values = torch.cat(old_v + [value_states], dim=TOKEN_AXIS)
        self.keys = torch.cat([self.keys, key_states], dim=TOKEN_AXIS)
        self.values = torch.cat([self.values, value_states], dim=TOKEN_AXIS)
        self.cumulative_length += key_states.shape[TOKEN_AXIS]
        self.flush()
        return keys, values

    def flush(self) -> None:
        """Moves the oldest whole groups beyond the ``residual`` newest tokens into storage."""
        g = self.spec.group_size
        extra = self.keys.shape[TOKEN_AXIS] - self.spec.residual
        m = extra // g * g if extra > 0 else 0
        if m == 0:
            return
        self.qkeys.append(self.keys[:, :, :m])
        self.qvalues.append(self.values[:, :, :m])
        self.keys = self.keys[:, :, m:].clone()  # the flushed part's memory is released
        self.values = self.values[:, :, m:].clone()

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> dict[str, int]:
        """Bytes held: codes, scales, zero points (keys + values) and the float window."""
        out = {"codes": 0, "scales": 0, "zero_points": 0, "window": 0}
        if not self.is_initialized:
            return out
        for store in (self.qkeys, self.qvalues):
            for k, v in store.nbytes().items():
                out[k] += v
        out["window"] = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return out

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("QuantizedKVCache cannot crop: quantized groups span several "
                             "tokens (use DynamicCache for assisted / speculative decoding)")

    def _each(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.qkeys.apply(fn)
            self.qvalues.apply(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # groups never span the batch: reordering the codes and scales is exact
        self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each(lambda t: t[indices, ...])


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` holding keys and values quantized KIVI-style (see the module
    docstring): pass it as ``past_key_values`` to ``generate`` or to a forward.

    Args:
        bits: 8 or 4 (``fmt="int"``); 8 (``fmt="fp8"``).
        fmt: ``"int"`` (integer codes) or ``"fp8"`` (FP8 E4M3).
        group_size: tokens per key group (per channel); also the flush chunk.
        residual: tokens kept in full precision (>= 0).
        symmetric: symmetric scales (default: False for ``"int"``, as KIVI; True for fp8).
        value_group_size: channels per value group (default ``min(group_size, head_dim)``);
            must divide the head dimension.

    Example::

        >>> import torch, qkern
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
        ...                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> cache = qkern.kv.QuantizedKVCache(bits=8, group_size=16, residual=16)
        >>> out = model.generate(torch.tensor([[1, 2, 3]]), past_key_values=cache,
        ...                      max_new_tokens=40, do_sample=False)
        >>> cache.get_seq_length(), cache.layers[0].qkeys.length  # 16 quantized, 26 in the window
        (42, 16)
        >>> cache.bytes_per_token() < 2 * 2 * 2 * 32 * 4        # layers x (k, v) x fp32 bytes
        True
    """

    def __init__(self, bits: int = 4, fmt: str = "int", group_size: int = 64,
                 residual: int = 128, symmetric: bool | None = None,
                 value_group_size: int | None = None):
        if symmetric is None:
            symmetric = fmt == "fp8"
        self.spec = KVSpec(bits, fmt, group_size, residual, symmetric, value_group_size)
        super().__init__(layer_class_to_replicate=functools.partial(QuantizedKVLayer, self.spec))

    def __repr__(self) -> str:
        s = self.spec
        return (f"QuantizedKVCache(bits={s.bits}, fmt={s.fmt!r}, group_size={s.group_size}, "
                f"residual={s.residual}, symmetric={s.symmetric}, layers={len(self.layers)})")

    def memory(self) -> dict[str, int]:
        """Bytes held over all layers, by kind: codes, scales, zero_points, window."""
        out = {"codes": 0, "scales": 0, "zero_points": 0, "window": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                out[k] += v
        return out

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (codes + scales + zero points + float window)."""
        return sum(self.memory().values())

    def bytes_per_token(self) -> float:
        """``nbytes()`` per cached token of one sequence (all layers, keys and values):
        over the sequence length times the batch size."""
        n = self.get_seq_length()
        if not n:
            return 0.0
        return self.nbytes() / (n * self.layers[0].keys.shape[0])
