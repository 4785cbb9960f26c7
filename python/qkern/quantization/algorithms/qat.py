"""Quantization-aware training (QAT): ``prepare(model, QATConfig(...))`` swaps every selected
``nn.Linear`` / ``nn.Conv2d`` for a training module (:class:`~qkern.quantization.qat.QATLinear`
/ ``QATConv2d``) that fake-quantizes its weight and (with ``activation=bits``) its input with
the method's rule; the learned scales are parameters of the prepared model, so an optimizer
made afterwards trains them with the weights. The user's own loop trains it (add
:func:`qat_regularization` to the loss for PACT); ``convert`` then builds qkern's quantized
modules (QuantLinear / QuantConv2d on the fused int kernels, the input quantized by an
``ActQuant`` with the learned scale), whose outputs equal the fake-quantized model's.

Methods (``method=``): ``"ste"`` (max-based scales, straight-through), ``"lsq"`` (Esser et al.
2020), ``"lsq+"`` (Bhalgat et al. 2020: learned activation offset, MSE initialisation),
``"pact"`` (Choi et al. 2018: learned activation clip; weights as ``"ste"``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...nn import QuantConv2d, QuantLinear
from ..layers import ActQuant
from ..qat import (
    AttentionQuant,
    FakeQuant,
    LSQPlusQuant,
    LSQQuant,
    PACTQuant,
    QATConv2d,
    QATLinear,
    STEQuant,
    bert_attention,
    register_transformers,
)
from ..registry import (
    BaseConfig,
    Quantizer,
    check_bool,
    check_choice,
    check_real,
    config_class,
    fail,
    register_quantizer,
    replace_module,
)

__all__ = ["QAT_METHODS", "QATConfig", "QATQuantizer", "qat_regularization"]

#: method -> the weight bit widths it takes
QAT_METHODS = {"ste": (2, 3, 4, 5, 6, 7, 8), "lsq": (2, 3, 4, 5, 6, 7, 8),
               "lsq+": (2, 3, 4, 5, 6, 7, 8), "pact": (2, 3, 4, 5, 6, 7, 8)}
_ACT_BITS = (2, 3, 4, 5, 6, 7, 8)


@config_class
@dataclass
class QATConfig(BaseConfig):
    """``weight``: weight bits (per output channel scales); ``activation``: input bits of
    every quantized layer, or None for weight-only QAT; ``act_signed``: None decides from
    the first batch (unsigned when it holds no negative value, e.g. after a ReLU);
    ``pact_alpha`` / ``pact_decay``: PACT's initial clip (None: the first batch's max; the
    paper's 10 suits ImageNet-scale activations, not inputs in [0, 1]) and its L2 weight.
    ``attention=True`` also fake-quantizes the attention matmuls' operands (Q, K, V after the
    KV cache, the softmax probabilities) at ``activation`` bits: transformers models through
    the ``"qkern_qat"`` attention implementation, qkern's BERT through its ``attn_fn`` hook.
    ``lsq_init``: ``"paper"`` (LSQ's ``2 mean|v| / sqrt(Q_P)``) or ``"max"`` (``max|v| / Q_P``:
    round-to-nearest's scales, a better start when fine-tuning a pretrained transformer).
    ``lm_head`` and embeddings stay float by default (``exclude``), as in the LLM methods."""

    weight: int = 4
    activation: int | None = 8
    method: str = "lsq"
    act_signed: bool | None = None
    pact_alpha: float | None = None
    pact_decay: float = 1e-4
    ema: float = 0.1  # "ste" activations: the moving average's weight of a new batch
    attention: bool = False
    lsq_init: str = "paper"
    exclude: list[str] = field(default_factory=lambda: ["lm_head", "Embedding"])

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_choice(n, "method", self.method, tuple(QAT_METHODS))
        if not isinstance(self.weight, int) or isinstance(self.weight, bool) or \
                self.weight not in QAT_METHODS[self.method]:
            fail(n, "weight", f"weight bits in {QAT_METHODS[self.method]} for method "
                 f"{self.method!r}", self.weight)
        if self.activation is not None and (isinstance(self.activation, bool)
                                            or self.activation not in _ACT_BITS):
            fail(n, "activation", f"None or activation bits in {_ACT_BITS}", self.activation)
        if self.method == "pact" and self.activation is None:
            fail(n, "activation", "activation bits for method 'pact' (it learns the "
                 "activation clip)", self.activation)
        if self.act_signed is not None:
            check_bool(n, "act_signed", self.act_signed)
        if self.method == "pact" and self.act_signed:
            fail(n, "act_signed", "None or False for PACT (it clips to [0, alpha])",
                 self.act_signed)
        if self.pact_alpha is not None:
            check_real(n, "pact_alpha", self.pact_alpha, 1e-6, 1e6, "None or a positive clip")
        check_real(n, "pact_decay", self.pact_decay, 0.0, 1e3, "an L2 weight >= 0")
        check_real(n, "ema", self.ema, 1e-6, 1.0, "a weight in (0, 1]")
        check_bool(n, "attention", self.attention)
        check_choice(n, "lsq_init", self.lsq_init, ("paper", "max"))
        if self.attention and self.activation is None:
            fail(n, "attention", "False without activation bits (the attention operands are "
                 "quantized at the activation bits)", self.attention)
        super().__post_init__()


def weight_quantizer(cfg: QATConfig, weight: torch.Tensor, name: str) -> FakeQuant:
    if cfg.method == "lsq":
        return LSQQuant(cfg.weight, True, 0, init=weight, name=name, init_mode=cfg.lsq_init)
    if cfg.method == "lsq+":
        return LSQPlusQuant(cfg.weight, True, 0, init=weight, offset=False, name=name)
    return STEQuant(cfg.weight, True, 0, momentum=None, name=name)  # ste, pact


def input_quantizer(cfg: QATConfig, name: str) -> FakeQuant | None:
    if cfg.activation is None:
        return None
    if cfg.method == "pact":
        return PACTQuant(cfg.activation, cfg.pact_alpha, cfg.pact_decay, name=name)
    if cfg.method == "lsq":
        q = LSQQuant(cfg.activation, cfg.act_signed, None, name=name, init_mode=cfg.lsq_init)
    elif cfg.method == "lsq+":
        q = LSQPlusQuant(cfg.activation, cfg.act_signed, None, offset=True, name=name)
    else:
        q = STEQuant(cfg.activation, cfg.act_signed, None, momentum=cfg.ema, name=name)
    return q


def qat_regularization(model: nn.Module) -> torch.Tensor | float:
    """The sum of the fake quantizers' loss terms (PACT's ``lambda * alpha^2``): add it to the
    training loss."""
    return sum((q.regularization() for q in model.modules() if isinstance(q, FakeQuant)), 0.0)


@register_quantizer(QATConfig)
class QATQuantizer(Quantizer):
    SUPPORTED = (nn.Linear, nn.Conv2d)

    def needs_calibration(self) -> str | None:
        if self.config.activation is not None or self.config.method == "ste":
            return ("learns its ranges while training (the activation quantizers are set by "
                    "the first batch)")
        return None

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        for name, cfg in self.plan:
            mod = model.get_submodule(name)
            wq = weight_quantizer(cfg, mod.weight.detach(), f"{name}.weight")
            aq = input_quantizer(cfg, f"{name} input")
            qat = QATLinear if isinstance(mod, nn.Linear) else QATConv2d
            replace_module(model, name, qat(mod, wq, aq))
        if self.config.attention:
            attach_attention(model, self.config)

    def calibrated(self, model: nn.Module) -> bool:
        return all(bool(q.initialized) for q in model.modules() if isinstance(q, FakeQuant))

    def convert(self, model: nn.Module) -> None:
        for name, _ in self.plan:
            mod = model.get_submodule(name)
            if not isinstance(mod, (QATLinear, QATConv2d)):
                raise ValueError(f"{name}: expected the QAT module prepare() put there, found "
                                 f"{type(mod).__name__}; was the prepared model modified?")
            self.swap(model, name, lambda: deploy(mod))


def attach_attention(model: nn.Module, cfg: QATConfig) -> int:
    """Gives every attention module of ``model`` an ``AttentionQuant`` (``qat_attention``) and
    routes its attention through it: transformers attention modules (a ``config`` whose
    ``_attn_implementation`` is set) by switching that config to ``"qkern_qat"``, qkern's BERT
    self-attention by its ``attn_fn``. Returns how many; none found raises ValueError."""
    found, configs = 0, []
    learned = cfg.method in ("lsq", "lsq+")
    for name, mod in model.named_modules():
        conf = getattr(mod, "config", None)
        is_hf = (type(mod).__name__.endswith("Attention") and hasattr(mod, "scaling")
                 and isinstance(getattr(conf, "_attn_implementation", None), str))
        if not (is_hf or hasattr(mod, "attn_fn")):
            continue
        mod.qat_attention = AttentionQuant(cfg.activation, learned, cfg.ema, name, cfg.lsq_init)
        found += 1
        if is_hf:
            if all(c is not conf for c in configs):
                configs.append(conf)
        else:
            mod.attn_fn = bert_attention
    if not found:
        raise ValueError(f"QATConfig(attention=True): {type(model).__name__} has no attention "
                         "module qkern can hook (transformers attention or qkern's BERT)")
    if configs:
        register_transformers()
        for conf in configs:
            conf._attn_implementation = "qkern_qat"
        top = getattr(model, "config", None)
        if top is not None and all(c is not top for c in configs):
            top._attn_implementation = "qkern_qat"
    return found


def deploy(mod: QATLinear | QATConv2d) -> nn.Module:
    """The quantized module equal to ``mod``'s fake-quantized forward: the weight on the
    learned per-channel grid (QuantLinear / QuantConv2d), the input through an ActQuant."""
    w = mod.weight_fake.deploy()
    if w.offset is not None:
        raise ValueError("a weight offset cannot be deployed")  # no method learns one
    k = mod.weight[0].numel()
    # one scale per output channel = one group of the whole row: the int2-4 kernels take
    # groups along the input (a multiple of 32), per-channel scales only through dequant
    if k % 32 == 0 and w.fmt in ("int2", "int3", "int4"):
        kw = {"group_size": k, "symmetric": True, "scale": w.scale.reshape(-1, 1)}
    else:
        kw = {"group_size": None, "symmetric": True, "scale": w.scale}
    if isinstance(mod, QATLinear):
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(mod.weight.detach())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.detach())
        q = QuantLinear.from_float(lin, w.fmt, **kw)
    else:
        conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                         mod.padding, mod.dilation, bias=mod.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(mod.weight.detach())
            if mod.bias is not None:
                conv.bias.copy_(mod.bias.detach())
        q = QuantConv2d.from_float(conv, w.fmt, **kw)
    if mod.input_fake is None:
        return q
    a = mod.input_fake.deploy()
    return ActQuant(q, a.fmt, a.scale, None, a.offset)
