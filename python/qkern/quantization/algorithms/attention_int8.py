"""PTQ of the attention matmuls: ``Q K^T`` and ``P V`` on int8 / uint8 operands with int32
accumulation (:class:`qkern.nn.Int8Attention`, whose docstring is the exact definition).

``prepare`` attaches an observer to every attention module through the QAT attention hook
(:func:`qkern.quantization.qat.attention.attach_attention`: transformers models switch to the
``"qkern_qat"`` attention implementation, qkern's BERT / Llama get an ``attn_fn``); while the
calibration data runs, attention stays float and the observer records, per head and channel,
max |Q|, |K| and |V| (K and V as attended: after the KV cache, repeated to the query heads).
``convert`` replaces each observer by an :class:`~qkern.nn.Int8Attention` with symmetric int8
scales ``amax / 127``: per head for Q and V, per head (``k_per_channel=False``) or per head
and channel for K (then Q is quantized after multiplying by K's channel scales, which keeps
``q . k`` one integer dot product). The probabilities are uint8 (scale 1/255) or fp8 e4m3.

The Linear layers are untouched: combine with a weight / activation config (e.g.
:class:`LLMInt8Config`) by quantizing twice. ``include`` / ``exclude`` / ``overrides`` match
the attention modules' names (``"model.layers.0.self_attn"``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...nn.attention import P_FORMATS, Int8Attention
from ..qat.attention import attach_attention, eager_attention
from ..registry import (
    BaseConfig,
    Quantizer,
    check_bool,
    check_choice,
    config_class,
    matches,
    register_quantizer,
)

__all__ = ["AttentionObserver", "QuantizedAttentionConfig", "QuantizedAttentionQuantizer"]

_TINY = 1e-8  # the amax of a channel that never moved: any scale works, keep it finite


@config_class
@dataclass
class QuantizedAttentionConfig(BaseConfig):
    """Integer attention after calibration: ``p_fmt`` ``"uint8"`` (P codes 0..255, scale
    1/255) or ``"fp8_e4m3"``; ``k_per_channel``: K scales per head and channel (else per
    head). Q and V always have one scale per head.

    >>> import torch, qkern
    >>> from qkern.models.llama import Llama, LlamaConfig
    >>> model = Llama(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
    ...                           num_hidden_layers=2, num_attention_heads=4,
    ...                           num_key_value_heads=2, max_position_embeddings=32)).eval()
    >>> ids = torch.randint(0, 256, (2, 16))
    >>> q = qkern.quantize_model(model, QuantizedAttentionConfig(), calibration=[ids])
    >>> type(q.model.layers[0].self_attn.qat_attention).__name__
    'Int8Attention'
    >>> bool((q(ids) - model(ids)).abs().max() < 0.5)
    True
    """

    p_fmt: str = "uint8"
    k_per_channel: bool = False
    FORMAT_FIELD: ClassVar[str] = "p_fmt"

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_choice(n, "p_fmt", self.p_fmt, P_FORMATS)
        check_bool(n, "k_per_channel", self.k_per_channel)
        super().__post_init__()


class _Amax(nn.Module):
    """Identity that records the running max |x| per head and channel of (B, H, T, D)."""

    def __init__(self):
        super().__init__()
        self.amax: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().float().abs().amax(dim=(0, 2))  # (H, D)
        if not bool(torch.isfinite(a).all()):
            raise ValueError("QuantizedAttentionConfig: NaN or Inf in the attention inputs "
                             "during calibration")
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        return x


class AttentionObserver(nn.Module):
    """The calibration rule: float attention (transformers' eager definition) that records
    max |Q|, |K|, |V| per head and channel; :meth:`deploy` builds the integer attention."""

    def __init__(self, name: str = ""):
        super().__init__()
        self.name = name
        self.q, self.k, self.v, self.p = _Amax(), _Amax(), _Amax(), nn.Identity()

    @property
    def seen(self) -> bool:
        return self.q.amax is not None

    def attend(self, query, key, value, mask, scaling, dropout=0.0, training=False):
        return eager_attention(self, query, key, value, mask, scaling, dropout, training)

    def deploy(self, cfg: QuantizedAttentionConfig) -> Int8Attention:
        if not self.seen:
            raise ValueError(f"QuantizedAttentionConfig: attention {self.name!r} saw no "
                             "calibration data")
        aq, ak, av = (m.amax.clamp_min(_TINY) for m in (self.q, self.k, self.v))
        if cfg.k_per_channel:
            sk = ak / 127.0  # (H, D)
            sq = (aq * sk).amax(1) / 127.0  # max |Q * s_k| per head
        else:
            sk = ak.amax(1, keepdim=True) / 127.0
            sq = aq.amax(1) / 127.0
        return Int8Attention(sq, sk, av.amax(1) / 127.0, cfg.p_fmt)


@register_quantizer(QuantizedAttentionConfig)
class QuantizedAttentionQuantizer(Quantizer):
    NEEDS_CALIBRATION = True

    def needs_calibration(self) -> str | None:
        return "calibrates the per-head scales of Q, K and V"

    def prepare(self, model: nn.Module) -> None:
        cfg = self.config

        def make(name: str, mod: nn.Module) -> nn.Module | None:
            if cfg.include is not None and not matches(name, mod, cfg.include):
                return None
            if matches(name, mod, cfg.exclude):
                return None
            c = cfg.for_layer(name)
            if c is None:
                return None
            self.plan.append((name, c))
            return AttentionObserver(name)

        attach_attention(model, make, type(cfg).__name__)

    def calibrated(self, model: nn.Module) -> bool:
        return all(model.get_submodule(n).qat_attention.seen for n, _ in self.plan)

    def convert(self, model: nn.Module) -> None:
        for name, c in self.plan:
            mod = model.get_submodule(name)
            mod.qat_attention = mod.qat_attention.deploy(c)
