"""1-bit QAT: BinaryConnect (Courbariaux et al. 2015), XNOR-Net (Rastegari et al. 2016) and
ABC-Net (Lin et al. 2017), with their deployment on qkern's binary kernels (gemm_binary).

- BinaryConnect: ``w_b = sign(w)`` (+1 where ``w >= 0``), or stochastically +1 with
  probability ``hard_sigmoid(w) = clip((w + 1) / 2, 0, 1)`` while training (deterministic sign
  in eval / at deploy); straight-through gradient ``1{|w| <= 1}``. The paper clips the latent
  float weights to [-1, 1] after each update: call :func:`clip_latent_weights` after
  ``optimizer.step()``. Deployed as the ``binary`` format with scale 1.
- XNOR-Net: weights ``alpha * sign(W)``, ``alpha = mean|W|`` per output filter (gradient by
  autograd through ``alpha`` and the clipped STE of ``sign``); inputs ``sign(I)`` (STE
  ``1{|x| <= 1}``) with the scaling map ``K`` (treated as a constant in the backward pass):
  per row ``mean|x|`` for a linear layer, ``K = A * k`` (``A`` the channel mean of ``|I|``,
  ``k`` a box filter of the kernel size, the conv's stride / padding / dilation) for a conv.
  Deployed on ``gemm_binary(xnor=True)`` (QuantLinear ``act="binary"``), whose per-row
  ``beta = mean|x|`` of the im2col patch *is* ``K``; the kernel binarizes the conv's zero
  padding to +1, so the deployed conv subtracts that padding's contribution beside the kernel.
- ABC-Net: ``W ~ sum_m alpha_m B_m``, ``B_m = sign(W - mean(W) + u_m std(W))`` with ``u_m``
  evenly spread in [-1, 1], ``alpha`` by least squares at the start and then trained (identity
  STE for the bases). The paper does not say how the scales are trained; their gradients
  are sums over the whole tensor and diverge at the weights' learning rate, so, as LSQ's step
  sizes, ``alpha`` / ``beta`` / ``v`` get their gradient scaled by ``1 / sqrt(numel)`` of the
  weight / input. Activations ``A ~ sum_n beta_n H_{v_n}(x)``, ``H_v(x) = +1 where
  clip(x + v, 0, 1) >= 0.5 else -1`` with learned shifts ``v_n`` and scales ``beta_n``
  (initialised from the first batch like the weights; STE ``1{0 <= x + v <= 1}``). Deployed
  as ``M`` (x ``N``) binary kernels summed.
``sign`` is +1 at 0 everywhere, as the kernels (bit = ``x < 0``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import formats as QF
from ...nn import QuantConv2d, QuantLinear
from ...observers.lsq import grad_scaled
from .base import Deployed, FakeQuant, refuse_converted
from .modules import QATConv2d, QATLinear, float_twin

__all__ = ["ABCInputQuant", "ABCWeightQuant", "BINARY_METHODS", "BinaryConnectQuant",
           "XNORConv2d", "XNORInputQuant", "XNORWeightQuant", "clip_latent_weights",
           "deploy_binary", "sign_pm"]

BINARY_METHODS = ("binaryconnect", "xnor", "abc")


def sign_pm(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, value, mask):
        ctx.save_for_backward(mask)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None, None


def _ste(x: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``value`` exactly forward, ``d/dx = mask`` (1 where None) backward."""
    return _STE.apply(x, value, torch.ones((), dtype=torch.bool) if mask is None else mask)


def _clip_mask(x: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    return (x.detach() >= lo) & (x.detach() <= hi)


class _Binary(FakeQuant):
    @property
    def format(self) -> QF.Format:
        return QF.get("binary")


class BinaryConnectQuant(_Binary):
    """BinaryConnect weights (``stochastic``: sampled while training)."""

    KIND = "binaryconnect"

    def __init__(self, stochastic: bool = False, name: str = ""):
        super().__init__(1, True, 0, name)
        self.stochastic = stochastic
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.stochastic and self.training:
            p = ((w.detach() + 1) / 2).clamp(0, 1)
            b = torch.where(torch.rand_like(p) < p, 1.0, -1.0).to(w.dtype)
        else:
            b = sign_pm(w.detach())
        return _ste(w, b, _clip_mask(w))

    def deploy(self) -> Deployed:
        return Deployed("binary", torch.ones(()), None, 0)


class XNORWeightQuant(_Binary):
    """``alpha * sign(W)``, ``alpha = mean|W|`` per output filter (axis 0)."""

    KIND = "xnor"

    def __init__(self, name: str = ""):
        super().__init__(1, True, 0, name)
        self.initialized.fill_(True)
        self.last_alpha: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        self.last_alpha = alpha.detach().reshape(-1)
        return alpha * _ste(w, sign_pm(w.detach()), _clip_mask(w))

    def deploy(self) -> Deployed:
        return Deployed("binary", self.last_alpha, None, 0)


class XNORInputQuant(_Binary):
    """``sign(x)`` with the clipped STE; for a linear layer the forward also applies the
    per-row ``K = mean|x|``; a conv (:class:`XNORConv2d`) applies ``K`` to its output."""

    KIND = "xnor"

    def __init__(self, name: str = ""):
        super().__init__(1, True, None, name)
        self.initialized.fill_(True)

    def signs(self, x: torch.Tensor) -> torch.Tensor:
        return _ste(x, sign_pm(x.detach()), _clip_mask(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.detach().abs().mean(-1, keepdim=True)
        return self.signs(x) * k

    def deploy(self) -> Deployed:
        return Deployed("binary", torch.ones(()), None, None)


class XNORConv2d(QATConv2d):
    """``(sign(I) conv alpha sign(W)) * K + b``, ``K = (mean_c |I|) conv box(kernel) / k``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_fake(self.weight)
        y = self._conv_forward(self.input_fake.signs(x), w, None)
        a = x.detach().abs().mean(1, keepdim=True)
        box = torch.full((1, 1, *self.kernel_size), 1.0 / (self.kernel_size[0]
                                                           * self.kernel_size[1]),
                         dtype=a.dtype, device=a.device)
        k = F.conv2d(a, box, None, self.stride, self.padding, self.dilation)
        y = y * k
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)


def _spread(m: int) -> torch.Tensor:
    """u_i = -1 + 2 (i - 1) / (M - 1), i = 1..M (0 when M = 1)."""
    return torch.zeros(1) if m == 1 else torch.linspace(-1.0, 1.0, m)


def _lstsq(target: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """argmin_a ||target - sum_i a_i bases[i]||, bases (M, numel)."""
    a = torch.linalg.lstsq(bases.double().T, target.double().reshape(-1, 1)).solution
    return a.reshape(-1).float()


class ABCWeightQuant(_Binary):
    """``sum_m alpha_m B_m``; ``alpha`` is a Parameter (least squares at construction)."""

    KIND = "abc"

    def __init__(self, bases: int, init: torch.Tensor, name: str = ""):
        super().__init__(1, True, None, name)
        self.m = bases
        self.register_buffer("u", _spread(bases))
        b = self.bases(init.detach().float())
        self.alpha = nn.Parameter(_lstsq(init.detach().float(), b.reshape(bases, -1)))
        self.initialized.fill_(True)

    def bases(self, w: torch.Tensor) -> torch.Tensor:
        """(M, *w.shape) signs, from the detached weight."""
        w = w.detach()
        mu, sd = w.mean(), w.std()
        return torch.stack([sign_pm(w - mu + u * sd) for u in self.u.tolist()])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        b = self.bases(w)
        b = torch.stack([_ste(w, bi, None) for bi in b])  # identity STE for the bases
        alpha = grad_scaled(self.alpha, w.numel() ** -0.5)
        return (alpha.reshape(-1, *([1] * w.dim())) * b).sum(0)

    def deploy(self) -> Deployed:
        return Deployed("binary", self.alpha.detach().clone(), None, None)


class ABCInputQuant(_Binary):
    """``sum_n beta_n H_{v_n}(x)``; shifts ``v`` and scales ``beta`` are Parameters set from
    the first batch (thresholds ``0.5 - v_n = mean + u_n std``, ``beta`` by least squares)."""

    KIND = "abc"

    def __init__(self, bases: int, name: str = ""):
        super().__init__(1, True, None, name)
        self.n = bases
        self.shift = nn.Parameter(torch.zeros(bases))
        self.beta = nn.Parameter(torch.ones(bases))

    def init_from(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        with torch.no_grad():
            self.shift.copy_(0.5 - (x.mean() + _spread(self.n) * x.std()))
            h = torch.stack([sign_pm((x + v).clamp(0, 1) - 0.5) for v in self.shift])
            self.beta.copy_(_lstsq(x, h.reshape(self.n, -1)))
        self.initialized.fill_(True)

    def bases(self, x: torch.Tensor) -> list[torch.Tensor]:
        """H_{v_n}(x) for each n, with the STE to x and v_n."""
        if not bool(self.initialized):
            self.init_from(x)
        out = []
        for v in grad_scaled(self.shift, x.numel() ** -0.5):
            z = x + v
            out.append(_ste(z, sign_pm(z.detach().clamp(0, 1) - 0.5), _clip_mask(z, 0.0, 1.0)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(x)
        beta = grad_scaled(self.beta, x.numel() ** -0.5)
        return sum(b * h for b, h in zip(beta, self.bases(x)))

    def deploy(self) -> Deployed:
        if not bool(self.initialized):
            raise ValueError(f"{self.where()}: has seen no data; run a batch through the "
                             "prepared model before convert()")
        return Deployed("binary", self.beta.detach().clone(), self.shift.detach().clone())


def clip_latent_weights(model: nn.Module) -> None:
    """BinaryConnect: clip every latent float weight to [-1, 1] (call after each
    ``optimizer.step()``, as the paper). A converted model is a ValueError."""
    refuse_converted(model, "clip_latent_weights")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (QATLinear, QATConv2d)) and \
                    isinstance(m.weight_fake, BinaryConnectQuant):
                m.weight.clamp_(-1.0, 1.0)


# -- deployment ------------------------------------------------------------------------------

def _binary_layer(mod: nn.Module, w2: torch.Tensor, alpha: torch.Tensor, act: str,
                  bias: bool) -> nn.Module:
    """A QuantLinear / QuantConv2d on the binary kernel with weights ``alpha[n] * sign``
    (``w2`` already of that form, so the codes are exact)."""
    cls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
    return cls.from_float(float_twin(mod, w2, bias), "binary", group_size=None, act=act,
                          scale=alpha.float())


class XNORDeployedConv2d(nn.Module):
    """QuantConv2d on gemm_binary(xnor=True) minus the zero padding's contribution (the
    kernel binarizes padded zeros to +1; XNOR-Net's conv of sign(I) pads with 0)."""

    def __init__(self, qconv: nn.Module, signs: torch.Tensor, alpha: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.qconv = qconv
        self.register_buffer("signs", signs.reshape(signs.shape[0], -1).float())
        self.register_buffer("alpha", alpha.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.qconv
        y = c(x)
        if any(p for p in c.padding):
            cols = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)  # (B, CK, L)
            beta = cols.abs().mean(1)  # (B, L): the kernel's per-row scale
            inside = F.unfold(torch.ones_like(x[:1]), c.kernel_size, c.dilation, c.padding,
                              c.stride)[0]  # (CK, L)
            pad = (1 - inside).T @ self.signs.T  # (L, N): sum of the signs on padded taps
            corr = beta.unsqueeze(-1) * pad * self.alpha  # (B, L, N)
            y = y - corr.transpose(1, 2).reshape(y.shape)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)


class ABCDeployed(nn.Module):
    """``sum_n beta_n sum_m layer_m(H_{v_n}(x)) + b`` (``N = 1``, ``H = x`` without
    activation bases): M binary layers (scale alpha_m each), bias added once."""

    def __init__(self, layers: list[nn.Module], shift: torch.Tensor | None,
                 beta: torch.Tensor | None, bias: torch.Tensor | None, conv: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.register_buffer("shift", None if shift is None else shift.float())
        self.register_buffer("beta", None if beta is None else beta.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is None:
            hs, bs = [x], [None]
        else:
            hs = [sign_pm((x + v).clamp(0, 1) - 0.5) for v in self.shift]
            bs = list(self.beta)
        y = 0
        for h, b in zip(hs, bs):
            yn = sum(layer(h) for layer in self.layers)
            y = y + (yn if b is None else b * yn)
        if self.bias is not None:
            y = y + (self.bias.reshape(1, -1, 1, 1) if self.conv else self.bias)
        return y


def deploy_binary(mod: QATLinear | QATConv2d, wrap_input) -> nn.Module:
    """The deployed module of a binary-method QAT layer; ``wrap_input(q, Deployed)`` wraps
    ``q`` with an ordinary (int) input quantizer (BinaryConnect with activation bits)."""
    wq, aq = mod.weight_fake, mod.input_fake
    w = mod.weight.detach().float()
    has_bias = mod.bias is not None
    if isinstance(wq, BinaryConnectQuant):
        q = _binary_layer(mod, sign_pm(w), torch.ones(w.shape[0]), "none", has_bias)
        return q if aq is None else wrap_input(q, aq.deploy())
    if isinstance(wq, XNORWeightQuant):
        alpha = w.abs().mean(dim=tuple(range(1, w.dim())))
        s = sign_pm(w)
        w2 = alpha.reshape(-1, *([1] * (w.dim() - 1))) * s
        if isinstance(mod, QATLinear):
            return _binary_layer(mod, w2, alpha, "binary", has_bias)
        qc = _binary_layer(mod, w2, alpha, "binary", False)
        return XNORDeployedConv2d(qc, s, alpha, mod.bias)
    if isinstance(wq, ABCWeightQuant):
        b = wq.bases(w)
        tiny = torch.finfo(torch.float32).tiny
        layers = [_binary_layer(mod, b[i] * a, a.abs().clamp(min=tiny).expand(w.shape[0]),
                                "none", False) for i, a in enumerate(wq.alpha.detach().float())]
        d = aq.deploy() if isinstance(aq, ABCInputQuant) else None
        return ABCDeployed(layers, None if d is None else d.offset,
                           None if d is None else d.scale, mod.bias,
                           isinstance(mod, QATConv2d))
    raise ValueError(f"{type(wq).__name__} is not a binary-method weight quantizer")
