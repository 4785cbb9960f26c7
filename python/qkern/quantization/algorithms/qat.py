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
``"pact"`` (Choi et al. 2018: learned activation clip; weights as ``"ste"``), ``"dorefa"``
(Zhou et al. 2016: tanh-normalised weights on a midrise grid, [0, 1] activations, optional
gradient bits), ``"ttq"`` (Zhu et al. 2017: ternary weights with learned W_p / W_n),
``"inq"`` (Zhou et al. 2017: power-of-two weights fixed incrementally by :func:`inq_step`;
TTQ and INQ inputs, with ``activation=bits``, as ``"ste"``), ``"relaxed"`` (Louizos et al.
2019: relaxed quantization, learned step and logistic noise scale, concrete / RQ-ST sampling
at temperature ``relaxed_tau``, quantization/qat/relaxed.py), and the 1-bit
``"binaryconnect"`` (Courbariaux et al. 2015), ``"xnor"`` (Rastegari et al. 2016) and ``"abc"``
(Lin et al. 2017; ``abc_weight_bases`` x ``abc_act_bases`` binary kernels), quantization/qat/
binary.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...nn import QuantConv2d, QuantLinear
from ..layers import ActQuant, ParallelSum
from ..qat import (
    BINARY_METHODS,
    ABCInputQuant,
    ABCWeightQuant,
    AttentionQuant,
    BinaryConnectQuant,
    Deployed,
    DoReFaActQuant,
    DoReFaGradQuant,
    DoReFaWeightQuant,
    FakeQuant,
    INQQuant,
    LSQPlusQuant,
    LSQQuant,
    PACTQuant,
    QATConv2d,
    QATLinear,
    RelaxedQuant,
    STEQuant,
    TokenQuant,
    TTQQuant,
    XNORConv2d,
    XNORInputQuant,
    XNORWeightQuant,
    clip_latent_weights,
    deploy_binary,
    float_twin,
    frozen_after_convert,
    inq_step,
    midrise_qtensor,
    quantized_layers,
    refuse_converted,
)
from ..qat import (
    attach_attention as attach,
)
from ..registry import (
    BaseConfig,
    Quantizer,
    check_bool,
    check_choice,
    check_int,
    check_real,
    config_class,
    fail,
    register_quantizer,
    replace_module,
)

__all__ = ["QAT_METHODS", "QATConfig", "QATQuantizer", "clip_latent_weights", "inq_step",
           "qat_regularization"]

_B28 = (2, 3, 4, 5, 6, 7, 8)
#: method -> the weight bit widths it takes
QAT_METHODS = {"ste": _B28, "lsq": _B28, "lsq+": _B28, "pact": _B28,
               "dorefa": (1,) + _B28, "ttq": (2,), "inq": _B28, "relaxed": _B28,
               "binaryconnect": (1,), "xnor": (1,), "abc": (1,)}
#: method -> the activation bit widths it takes (None: weight-only is allowed)
_METHOD_ACT = {"binaryconnect": (None, *_B28), "xnor": (1,), "abc": (None, 1)}
_ACT_BITS = _B28
_GRAD_BITS = tuple(range(2, 17))
#: the methods whose weight quantizer takes ``group_size`` / whose input quantizer is swapped
#: for the per-token one with ``act_granularity="token"``
_GROUP_METHODS = ("ste", "lsq", "lsq+", "pact")
_TOKEN_METHODS = ("ste", "lsq", "lsq+")


@config_class
@dataclass
class QATConfig(BaseConfig):
    """``weight``: weight bits (per output channel scales); ``activation``: input bits of
    every quantized layer, or None for weight-only QAT; ``act_signed``: None decides from
    the first batch (unsigned when it holds no negative value, e.g. after a ReLU);
    ``pact_alpha`` / ``pact_decay``: PACT's initial clip (None: the first batch's max; the
    paper's 10 suits ImageNet-scale activations, not inputs in [0, 1]) and its L2 weight;
    ``stochastic``: BinaryConnect's stochastic binarization while training, or with
    ``method="dorefa"`` and ``grad_bits`` the paper's uniform noise on the quantized gradients;
    ``abc_weight_bases`` / ``abc_act_bases``: ABC-Net's M and N.
    ``attention=True`` also fake-quantizes the attention matmuls' operands (Q, K, V after the
    KV cache, the softmax probabilities) at ``activation`` bits: transformers models through
    the ``"qkern_qat"`` attention implementation, qkern's BERT and Llama through their
    ``attn_fn`` hook.
    ``lsq_init``: ``"paper"`` (LSQ's ``2 mean|v| / sqrt(Q_P)``), ``"max"`` (``max|v| / Q_P``:
    round-to-nearest's scales, a better start when fine-tuning a pretrained transformer) or
    ``"mse"`` (the clip ``r max|v|`` with the least squared error, per scale).
    ``group_size``: None (one weight scale per output channel) or one learned scale per group
    of ``group_size`` consecutive input weights (``"ste"`` / ``"lsq"`` / ``"lsq+"`` /
    ``"pact"``; it must divide each layer's input size); converted to QuantLinear with that
    group size. ``act_granularity``: ``"tensor"`` (one learned / tracked input scale) or
    ``"token"`` (8-bit only, ``"ste"`` / ``"lsq"`` / ``"lsq+"``, Linear layers: each token's
    max-abs scale at run time, converted to ``act="int8_token"``); set it per layer with
    ``overrides={"pattern": {"act_granularity": "token"}}``.
    ``relaxed_tau`` / ``relaxed_hard``: method ``"relaxed"``'s concrete temperature and
    RQ-ST (a hard sampled grid point forward, the concrete sample's gradient).
    ``lm_head`` and embeddings stay float by default (``exclude``), as in the LLM methods."""

    weight: int = 4
    activation: int | None = 8
    method: str = "lsq"
    act_signed: bool | None = None
    pact_alpha: float | None = None
    pact_decay: float = 1e-4
    ema: float = 0.1  # "ste" activations: the moving average's weight of a new batch
    grad_bits: int | None = None  # "dorefa": quantize each layer's output gradient
    ttq_threshold: float = 0.05  # "ttq": delta = ttq_threshold * max|w| per layer
    inq_schedule: tuple = (0.5, 0.75, 0.875, 1.0)  # "inq": fractions fixed by inq_step
    stochastic: bool = False
    abc_weight_bases: int = 3
    abc_act_bases: int = 3
    attention: bool = False
    lsq_init: str = "paper"
    relaxed_tau: float = 1.0  # "relaxed": the concrete distribution's temperature
    relaxed_hard: bool = False  # "relaxed": RQ-ST (hard sampled grid point forward)
    group_size: int | None = None
    act_granularity: str = "tensor"
    exclude: list[str] = field(default_factory=lambda: ["lm_head", "Embedding"])

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_choice(n, "method", self.method, tuple(QAT_METHODS))
        if not isinstance(self.weight, int) or isinstance(self.weight, bool) or \
                self.weight not in QAT_METHODS[self.method]:
            fail(n, "weight", f"weight bits in {QAT_METHODS[self.method]} for method "
                 f"{self.method!r}", self.weight)
        acts = _METHOD_ACT.get(self.method, (None, *_ACT_BITS))
        if isinstance(self.activation, bool) or self.activation not in acts:
            fail(n, "activation", f"activation bits in {acts} for method {self.method!r} "
                 "(None: weight-only)", self.activation)
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
        if self.method == "dorefa" and self.act_signed:
            fail(n, "act_signed", "None or False for DoReFa (it clips to [0, 1])",
                 self.act_signed)
        if self.grad_bits is not None and (self.method != "dorefa" or isinstance(
                self.grad_bits, bool) or self.grad_bits not in _GRAD_BITS):
            fail(n, "grad_bits", "None, or gradient bits in 2..16 with method 'dorefa'",
                 self.grad_bits)
        check_real(n, "ttq_threshold", self.ttq_threshold, 1e-6, 0.999, "a fraction in (0, 1)")
        sch = self.inq_schedule
        if not (isinstance(sch, (tuple, list)) and sch
                and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in sch)
                and all(0 <= a < b for a, b in zip((0,) + tuple(sch), sch))
                and float(sch[-1]) == 1.0):
            fail(n, "inq_schedule", "increasing fractions in (0, 1] ending at 1.0",
                 self.inq_schedule)
        check_bool(n, "stochastic", self.stochastic)
        if self.stochastic and not (self.method == "binaryconnect" or (
                self.method == "dorefa" and self.grad_bits is not None)):
            fail(n, "stochastic", "False unless method='binaryconnect', or 'dorefa' with "
                 "grad_bits", self.stochastic)
        for f in ("abc_weight_bases", "abc_act_bases"):
            check_int(n, f, getattr(self, f), 1)
            if getattr(self, f) > 8:
                fail(n, f, "a number of binary bases in 1..8", getattr(self, f))
        check_bool(n, "attention", self.attention)
        check_choice(n, "lsq_init", self.lsq_init, ("paper", "max", "mse"))
        check_real(n, "relaxed_tau", self.relaxed_tau, 1e-3, 1e3, "a temperature in "
                   "[0.001, 1000]")
        check_bool(n, "relaxed_hard", self.relaxed_hard)
        if self.group_size is not None:
            check_int(n, "group_size", self.group_size, 1)
            if self.method not in _GROUP_METHODS:
                fail(n, "group_size", f"None for method {self.method!r} (group-wise weight "
                     f"scales: methods {_GROUP_METHODS})", self.group_size)
        check_choice(n, "act_granularity", self.act_granularity, ("tensor", "token"))
        if self.act_granularity == "token" and (self.method not in _TOKEN_METHODS
                                                or self.activation != 8):
            fail(n, "act_granularity", f"'tensor' unless activation=8 with a method in "
                 f"{_TOKEN_METHODS} (per-token scales are int8, deployed as act='int8_token'; "
                 f"got method {self.method!r}, activation {self.activation})",
                 self.act_granularity)
        if self.attention and self.activation is None:
            fail(n, "attention", "False without activation bits (the attention operands are "
                 "quantized at the activation bits)", self.attention)
        super().__post_init__()


def weight_quantizer(cfg: QATConfig, weight: torch.Tensor, name: str) -> FakeQuant:
    if cfg.method == "dorefa":
        return DoReFaWeightQuant(cfg.weight, name=name)
    if cfg.method == "ttq":
        return TTQQuant(weight, cfg.ttq_threshold, name=name)
    if cfg.method == "inq":
        return INQQuant(cfg.weight, weight, cfg.inq_schedule, name=name)
    if cfg.method == "binaryconnect":
        return BinaryConnectQuant(cfg.stochastic, name=name)
    if cfg.method == "xnor":
        return XNORWeightQuant(name=name)
    if cfg.method == "abc":
        return ABCWeightQuant(cfg.abc_weight_bases, weight, name=name)
    g = cfg.group_size
    if g is not None and weight[0].numel() % g:
        raise ValueError(f"{name}: QATConfig.group_size {g} does not divide the layer's input "
                         f"size {weight[0].numel()}; pick a divisor, or exclude / override "
                         "the layer")
    if cfg.method == "relaxed":
        return RelaxedQuant(cfg.weight, True, 0, init=weight, name=name, tau=cfg.relaxed_tau,
                            hard=cfg.relaxed_hard)
    if cfg.method == "lsq":
        return LSQQuant(cfg.weight, True, 0, init=weight, name=name, init_mode=cfg.lsq_init,
                        group_size=g)
    if cfg.method == "lsq+":
        return LSQPlusQuant(cfg.weight, True, 0, init=weight, offset=False, name=name,
                            group_size=g)
    return STEQuant(cfg.weight, True, 0, momentum=None, name=name, group_size=g)  # ste, pact


def input_quantizer(cfg: QATConfig, name: str) -> FakeQuant | None:
    if cfg.activation is None:
        return None
    if cfg.method == "dorefa":
        return DoReFaActQuant(cfg.activation, name=name)
    if cfg.method == "xnor":
        return XNORInputQuant(name=name)
    if cfg.method == "abc":
        return ABCInputQuant(cfg.abc_act_bases, name=name)
    if cfg.act_granularity == "token":
        return TokenQuant(name=name)
    if cfg.method == "relaxed":
        return RelaxedQuant(cfg.activation, cfg.act_signed, None, name=name,
                            tau=cfg.relaxed_tau, hard=cfg.relaxed_hard)
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
    training loss. A converted model is a ValueError (nothing left to regularize)."""
    refuse_converted(model, "qat_regularization")
    return sum((q.regularization() for q in model.modules() if isinstance(q, FakeQuant)), 0.0)


@register_quantizer(QATConfig)
class QATQuantizer(Quantizer):
    SUPPORTED = (nn.Linear, nn.Conv2d)

    def needs_calibration(self) -> str | None:
        cfg = self.config
        if (cfg.activation is not None and cfg.method != "dorefa") or cfg.method == "ste":
            return ("learns its ranges while training (the activation quantizers are set by "
                    "the first batch)")
        return None

    def prepare(self, model: nn.Module) -> None:
        done = quantized_layers(model)
        if done:
            raise ValueError(f"QATConfig: the model holds converted quantized layers ({done[0]!r}"
                             ", ...) whose integer weights cannot train: prepare the float "
                             "model and train it before convert()")
        super().prepare(model)
        for name, cfg in self.plan:
            mod = model.get_submodule(name)
            if cfg.act_granularity == "token" and not isinstance(mod, nn.Linear):
                raise ValueError(f"{name}: act_granularity='token' takes nn.Linear layers "
                                 f"only (per-token int8 deploys as QuantLinear), not "
                                 f"{type(mod).__name__}; override it to 'tensor' there")
            wq = weight_quantizer(cfg, mod.weight.detach(), f"{name}.weight")
            aq = input_quantizer(cfg, f"{name} input")
            gq = None if cfg.grad_bits is None else DoReFaGradQuant(cfg.grad_bits, cfg.stochastic)
            qat = QATLinear if isinstance(mod, nn.Linear) else \
                XNORConv2d if cfg.method == "xnor" else QATConv2d
            replace_module(model, name, qat(mod, wq, aq) if gq is None else qat(mod, wq, aq, gq))
        if self.config.attention:
            attach_attention(model, self.config)

    def calibrated(self, model: nn.Module) -> bool:
        return all(bool(q.initialized) for q in model.modules() if isinstance(q, FakeQuant))

    def convert(self, model: nn.Module) -> None:
        for q in model.modules():  # before any swap: INQ's schedule must be complete
            if isinstance(q, FakeQuant):
                q.check_ready()
        for name, cfg in self.plan:
            mod = model.get_submodule(name)
            if not isinstance(mod, (QATLinear, QATConv2d)):
                raise ValueError(f"{name}: expected the QAT module prepare() put there, found "
                                 f"{type(mod).__name__}; was the prepared model modified?")
            if cfg.method in BINARY_METHODS:
                self.swap(model, name, lambda: deploy_binary(mod, _wrap_input))
            else:
                self.swap(model, name, lambda: deploy(mod))
        model.eval()  # a converted model runs inference; training it warns (below)
        model.register_forward_hook(frozen_after_convert)


def _wrap_input(q: nn.Module, a) -> nn.Module:
    return ActQuant(q, a.fmt, a.scale, None, a.offset)


def _layer(mod: QATLinear | QATConv2d, w: Deployed, bias: bool, act: str = "none"
           ) -> nn.Module:
    """QuantLinear / QuantConv2d of ``mod`` on the grid ``w`` (its ``weight`` values, or the
    latent weight rounded on ``w.scale``); ``act``: QuantLinear's activation mode."""
    if w.offset is not None:
        raise ValueError("a weight offset cannot be deployed")  # no method learns one
    k = mod.weight[0].numel()
    if w.quantizer == "midrise" and isinstance(mod, QATLinear) and k % 32 == 0 and \
            w.fmt in ("int2", "int3", "int4"):  # DoReFa: on the fused kernels' float zeros
        b = mod.bias.detach().clone() if bias and mod.bias is not None else None
        return QuantLinear(midrise_qtensor(w.weight, w.scale, int(w.fmt[3:])), b)
    kw = {"symmetric": True, "quantizer": w.quantizer}
    if act != "none":
        kw["act"] = act
    # one scale per output channel = one group of the whole row: the int2-4 / lut4 kernels
    # take groups along the input (a multiple of 32), per-channel scales only through dequant;
    # the ternary kernel takes one scale per output channel
    if w.group_size is not None:  # (out, in / g) learned scales
        kw.update(group_size=w.group_size, scale=w.scale)
    elif k % 32 == 0 and w.quantizer == "midtread" and w.fmt in ("int2", "int3", "int4",
                                                                  "log2_4"):
        kw.update(group_size=k, scale=w.scale.reshape(-1, 1))
    else:
        kw.update(group_size=None, scale=w.scale)
    src = mod.weight.detach() if w.weight is None else w.weight.to(mod.weight.dtype)
    cls = QuantLinear if isinstance(mod, QATLinear) else QuantConv2d
    return cls.from_float(float_twin(mod, src, mod.bias is not None and bias), w.fmt, **kw)


def attach_attention(model: nn.Module, cfg: QATConfig) -> int:
    """Gives every attention module of ``model`` an ``AttentionQuant`` (``qat_attention``) and
    routes its attention through it (:func:`qkern.quantization.qat.attention.attach_attention`:
    transformers attention by ``"qkern_qat"``, qkern's BERT and Llama by their ``attn_fn``).
    Returns how many; none found raises ValueError."""
    learned = cfg.method in ("lsq", "lsq+")
    return attach(model, lambda name, mod: AttentionQuant(cfg.activation, learned, cfg.ema,
                                                          name, cfg.lsq_init))


def deploy(mod: QATLinear | QATConv2d) -> nn.Module:
    """The quantized module equal to ``mod``'s fake-quantized forward: the weight on the
    learned grid (QuantLinear / QuantConv2d; TTQ's two-scale ternary weight as a
    :class:`ParallelSum` of two ternary layers), the input through an ActQuant."""
    w = mod.weight_fake.deploy_weight(mod.weight.detach())
    a = None if mod.input_fake is None else mod.input_fake.deploy()
    if a is not None and a.granularity == "token":  # dynamic: inside QuantLinear
        return _layer(mod, w, True, "int8_token")
    if w.parts:
        q = ParallelSum([_layer(mod, p, i == 0) for i, p in enumerate(w.parts)])
    else:
        q = _layer(mod, w, True)
    if a is None:
        return q
    return ActQuant(q, a.fmt, a.scale, None, a.offset)
