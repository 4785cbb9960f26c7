"""QAT of the attention matmuls: ``softmax(Q K^T * scaling + mask) V`` with Q, K, V (K and V as
attended, i.e. after the KV cache) and the softmax probabilities P fake-quantized by learned
quantizers (:class:`AttentionQuant`), computed eagerly.

Two hooks use it: transformers models route attention through an attention function chosen by
``config._attn_implementation``; :func:`register_transformers` registers
:func:`transformers_attention` as ``"qkern_qat"`` (with transformers' eager additive mask), and
``prepare`` sets the prepared copy's implementation to it. qkern's own models (BERT in
:mod:`qkern.models.bert`, Llama in :mod:`qkern.models.llama`, KV cache included) call their
attention modules' ``attn_fn`` when set (:func:`qkern_attention`). After ``convert`` these
quantizers stay as fake quantization.

The same hook serves any attention rule: :func:`attach_attention` gives every attention module
an ``nn.Module`` under ``qat_attention`` with a method ``attend(query, key, value, mask,
scaling, dropout, training) -> (output, P)`` and routes the module's attention to it. QAT
attaches :class:`AttentionQuant`; PTQ's integer attention
(:class:`qkern.quantization.algorithms.attention_int8.QuantizedAttentionConfig`) attaches its
observer, then :class:`qkern.nn.Int8Attention`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import FakeQuant
from .lsq import LSQQuant
from .ste import STEQuant

__all__ = ["IMPLEMENTATION", "AttentionQuant", "attach_attention", "eager_attention",
           "qkern_attention", "register_transformers", "transformers_attention"]

#: the name of the transformers attention implementation
IMPLEMENTATION = "qkern_qat"


class AttentionQuant(nn.Module):
    """The four fake quantizers of one attention layer: ``q``, ``k``, ``v`` (signed, one scale
    per tensor) and ``p`` (the softmax probabilities, unsigned, per tensor, initialised to the
    full [0, 1] range: ``scale = 1 / (2^bits - 1)``). ``learned=True``: LSQ step sizes;
    False: max-based scales with a moving average (the ``"ste"`` / ``"pact"`` methods)."""

    def __init__(self, bits: int, learned: bool = True, ema: float = 0.1, name: str = "",
                 init_mode: str = "paper"):
        super().__init__()
        self.bits = bits

        def make(what: str, signed: bool) -> FakeQuant:
            n = f"{name} attention {what}"
            if learned:
                return LSQQuant(bits, signed, None, name=n, init_mode=init_mode)
            return STEQuant(bits, signed, None, momentum=ema, name=n)

        self.q, self.k, self.v, self.p = (make("query", True), make("key", True),
                                          make("value", True), make("probabilities", False))
        if learned:  # P lies in [0, 1]: LSQ's 2 mean|v| / sqrt(Q_P) would clip large ones
            with torch.no_grad():
                self.p.scale.fill_(1.0 / (2 ** bits - 1))
            self.p.initialized.fill_(True)

    def attend(self, query, key, value, mask, scaling, dropout=0.0, training=False):
        """:func:`eager_attention` through these quantizers."""
        return eager_attention(self, query, key, value, mask, scaling, dropout, training)


def eager_attention(qa: AttentionQuant, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                    dropout: float = 0.0, training: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P V, P)`` with ``P = softmax(q(Q) q(K)^T * scaling + mask)`` fake-quantized; query
    (B, H, Tq, D), key / value (B, H, Tk, D) (already repeated to H heads); ``mask``: additive
    float or boolean (True = attend), broadcastable to (B, H, Tq, Tk)."""
    q, k, v = qa.q(query), qa.k(key), qa.v(value)
    s = torch.matmul(q, k.transpose(-2, -1)) * scaling
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)
    p = F.dropout(qa.p(p), p=dropout, training=training)
    return torch.matmul(p, v), p


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def transformers_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None,
                           scaling: float | None = None, dropout: float = 0.0, **kwargs
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function signature: returns ``(output (B, Tq, H, D), P)``.
    ``module.qat_attention`` holds the quantizers (set by ``prepare``)."""
    qa = _rule(module)
    n = getattr(module, "num_key_value_groups", 1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out, p = qa.attend(query, _repeat_kv(key, n), _repeat_kv(value, n), attention_mask,
                       scaling, dropout, module.training)
    return out.transpose(1, 2).contiguous(), p


def qkern_attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   keep: torch.Tensor) -> torch.Tensor:
    """The ``attn_fn`` of qkern's BERT self-attention and Llama attention: (B, H, T, D) in and
    out (K and V as attended), ``keep`` boolean, True where a query may attend a key."""
    out, _ = _rule(module).attend(q, k, v, keep, q.shape[-1] ** -0.5)
    return out


def _rule(module: nn.Module) -> nn.Module:
    qa = getattr(module, "qat_attention", None)
    if not (isinstance(qa, nn.Module) and callable(getattr(qa, "attend", None))):
        raise ValueError(f"{type(module).__name__}: attention implementation {IMPLEMENTATION!r} "
                         "needs the attention module prepare(..., QATConfig(attention=True)) or "
                         "QuantizedAttentionConfig attaches (qat_attention with attend())")
    return qa


def attach_attention(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None],
                     what: str = "QATConfig(attention=True)") -> int:
    """Gives every attention module of ``model`` the rule ``make(name, module)`` returns (as
    ``qat_attention``; None leaves that module alone) and routes its attention through it:
    transformers attention modules (a ``config`` whose ``_attn_implementation`` is set) by
    switching that config to ``"qkern_qat"``, qkern's own BERT and Llama attention by their
    ``attn_fn``. Returns how many; none found raises ValueError naming ``what``."""
    found, configs = 0, []
    for name, mod in model.named_modules():
        conf = getattr(mod, "config", None)
        is_hf = (type(mod).__name__.endswith("Attention") and hasattr(mod, "scaling")
                 and isinstance(getattr(conf, "_attn_implementation", None), str))
        if not (is_hf or hasattr(mod, "attn_fn")):
            continue
        rule = make(name, mod)
        if rule is None:
            continue
        mod.qat_attention = rule
        found += 1
        if is_hf:
            if all(c is not conf for c in configs):
                configs.append(conf)
        else:
            mod.attn_fn = qkern_attention
    if not found:
        raise ValueError(f"{what}: {type(model).__name__} has no attention module qkern can "
                         "hook (transformers attention or qkern's BERT / Llama)")
    if configs:
        register_transformers()
        for conf in configs:
            conf._attn_implementation = IMPLEMENTATION
        top = getattr(model, "config", None)
        if top is not None and all(c is not top for c in configs):
            top._attn_implementation = IMPLEMENTATION
    return found


def register_transformers() -> None:
    """Registers ``"qkern_qat"`` with transformers' attention and mask interfaces (once)."""
    from transformers import AttentionInterface  # optional dependency: only for its models
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, transformers_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
