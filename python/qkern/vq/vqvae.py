"""VQ-VAE codebooks (van den Oord et al. 2017, "Neural Discrete Representation Learning";
Razavi et al. 2019, VQ-VAE-2) and a small MLP VQ-VAE behind :class:`~qkern.vq.base.VQBase`.

:class:`VQCodebook` is the layer: each ``dim``-vector of its input is replaced by its nearest
code (squared L2), with the straight-through estimator for the gradient, a commitment loss, and
either a learned codebook (codebook loss) or exponential-moving-average updates; unused codes
can be restarted on current encoder outputs. :class:`VQVAE` puts it between an MLP encoder and
decoder and trains the three with Adam on (n, d) data.

    q = VQVAE(d=64, latent_positions=4, code_dim=8, num_codes=64).train(x, epochs=40)
    codes = q.encode(x)          # (n, 4) int64 in [0, 64): 4 * 6 = 24 bits per vector
    x_hat = q.decode(codes)      # (n, 64) float32
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import VQBase, as_codes

__all__ = ["VQCodebook", "VQVAE"]


def _positive_int(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


class VQCodebook(nn.Module):
    """A codebook of ``num_codes`` vectors of dimension ``dim`` for VQ-VAEs.

    ``forward(z)``, z of shape (..., dim), returns ``(z_q, codes, loss)``:

    - ``codes`` (...,) int64: the index of the nearest code of every vector (squared L2,
      lowest index on ties);
    - ``z_q = z + (q - z).detach()`` with ``q = codebook[codes]``: the values of q, the gradient
      of z (straight-through estimator);
    - ``loss = commitment_weight * mean((z - sg(q))^2)``, plus ``mean((sg(z) - q)^2)`` (the
      codebook term) when ``ema=False`` (means over all elements of z).

    With ``ema=True`` the codebook is a buffer, updated in training mode by exponential moving
    averages (van den Oord et al. 2017, appendix A.1): with ``n_k`` the number of vectors of the
    batch assigned to code k and ``s_k`` their sum,
    ``N_k <- decay N_k + (1 - decay) n_k``, ``m_k <- decay m_k + (1 - decay) s_k``, and
    ``e_k = m_k / Ñ_k`` with the Laplace-smoothed counts
    ``Ñ_k = (N_k + eps) / (sum N + num_codes eps) * sum N``. ``N`` starts at 1 and ``m`` at the
    initial codebook (so an unused code decays towards itself and keeps its place).
    The update happens after the batch is quantized (z_q uses the codebook before the step).

    ``restart_after``: in training mode, a code no vector chose for that many consecutive
    forward calls is moved onto a random vector of the current batch (detached; its EMA state
    reset to count 1). ``init="data"`` sets the codebook, on the first training forward, to
    random vectors of that batch (``"random"``: keep the seeded normal initialization).
    Random choices use the module's own generator, seeded by ``seed``.

    After each forward, :attr:`perplexity` holds ``exp(-sum p_k log p_k)`` of the batch's code
    frequencies p (1: one code used; ``num_codes``: all used equally).

    >>> import torch
    >>> vq = VQCodebook(num_codes=16, dim=4, ema=True, restart_after=50)
    >>> z = torch.randn(32, 3, 4, requires_grad=True)
    >>> z_q, codes, loss = vq(z)
    >>> z_q.shape, codes.shape, bool(codes.max() < 16)
    (torch.Size([32, 3, 4]), torch.Size([32, 3]), True)
    >>> (z_q.sum() + loss).backward(); z.grad.shape
    torch.Size([32, 3, 4])
    """

    def __init__(self, num_codes: int, dim: int, commitment_weight: float = 0.25,
                 ema: bool = True, decay: float = 0.99, eps: float = 1e-5,
                 restart_after: int | None = None, init: str = "data", seed: int = 0):
        super().__init__()
        self.num_codes = _positive_int("num_codes", num_codes)
        self.dim = _positive_int("dim", dim)
        if not (math.isfinite(commitment_weight) and commitment_weight >= 0):
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if restart_after is not None:
            _positive_int("restart_after", restart_after)
        if init not in ("data", "random"):
            raise ValueError(f"init must be 'data' or 'random', got {init!r}")
        self.commitment_weight, self.ema, self.decay, self.eps = commitment_weight, ema, decay, eps
        self.restart_after, self.init = restart_after, init
        self.generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(num_codes, dim, generator=self.generator)
        if ema:
            self.register_buffer("weight", weight)
        else:
            self.weight = nn.Parameter(weight)
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", weight.clone())
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(init == "random"))
        self.perplexity = float("nan")
        self.restarts = 0  # codes restarted so far

    # ---- search ------------------------------------------------------------------------
    def check(self, z: torch.Tensor) -> None:
        """Raises ValueError (TypeError for a non-tensor) unless z is a finite real (..., dim)
        tensor."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"VQCodebook: z must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise ValueError(f"VQCodebook: z must be a floating-point tensor, got {z.dtype}")
        if z.dim() == 0 or z.shape[-1] != self.dim:
            raise ValueError(f"VQCodebook: z's last dimension must be the codebook's dim "
                             f"{self.dim}, got shape {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            bad = int((~torch.isfinite(z.detach())).reshape(-1, self.dim).any(dim=1).sum())
            raise ValueError(f"VQCodebook: z contains NaN or Inf ({bad} of "
                             f"{z.numel() // self.dim} vectors)")

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2) of every row of ``flat`` (n, dim), int64.
        Distances are ``||z||^2 - 2 z.e + ||e||^2`` in float32 (the ||z||^2 term is the same
        for all codes of a row and left out), so codes closer than float32's rounding of the
        expansion may be told apart wrongly."""
        w = self.weight.detach().float()
        dist = (w * w).sum(dim=1)[None, :] - 2.0 * flat.detach().float() @ w.t()
        return dist.argmin(dim=1)

    # ---- forward -----------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check(z)
        flat = z.reshape(-1, self.dim)
        if self.training and not bool(self.initialized):
            self._init_from(flat.detach())
        codes = self.nearest(flat)
        q = self.weight[codes].to(z.dtype).reshape(z.shape)
        loss = self.commitment_weight * F.mse_loss(z, q.detach())
        if not self.ema:
            loss = loss + F.mse_loss(q, z.detach())
        z_q = z + (q - z).detach()
        counts = torch.bincount(codes, minlength=self.num_codes)
        p = counts.double() / max(codes.numel(), 1)
        self.perplexity = float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))
        if self.training:
            with torch.no_grad():
                if self.ema:
                    self._ema_update(flat.detach().float(), codes, counts)
                if self.restart_after is not None:
                    self._restart(flat.detach().float(), counts)
        return z_q, codes.reshape(z.shape[:-1]), loss

    # ---- training updates --------------------------------------------------------------
    @torch.no_grad()
    def _set_codes(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        self.weight[idx] = values.to(self.weight.dtype)
        self.ema_count[idx] = 1.0
        self.ema_sum[idx] = values.to(self.ema_sum.dtype)
        self.unused_steps[idx] = 0

    def _sample(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        n = flat.shape[0]
        if n >= k:
            rows = torch.randperm(n, generator=self.generator)[:k]
        else:
            rows = torch.randint(n, (k,), generator=self.generator)
        return flat[rows].float()

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        self._set_codes(torch.arange(self.num_codes), self._sample(flat, self.num_codes))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, flat)
        self.ema_count.mul_(self.decay).add_(counts.float(), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total
        self.weight.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = torch.nonzero(self.unused_steps >= self.restart_after).flatten()
        if dead.numel():
            self._set_codes(dead, self._sample(flat, dead.numel()))
            self.restarts += int(dead.numel())

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, ema={self.ema}, "
                f"commitment_weight={self.commitment_weight}, restart_after={self.restart_after}")


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VQVAE(VQBase):
    """A small VQ-VAE on (n, d) vectors: an MLP encoder (d -> hidden -> hidden ->
    latent_positions * code_dim), one :class:`VQCodebook` (EMA updates, dead-code restarts)
    shared by the ``latent_positions`` latent vectors, and an MLP decoder back to d.

    Inputs are standardized by the training data's per-coordinate mean and overall standard
    deviation (kept in the state). ``code_size_bits = latent_positions * ceil(log2(num_codes))``.
    Everything random (weights, shuffling, codebook init and restarts) follows ``seed``, so two
    runs with the same seed, data and torch build give the same model.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
    >>> q = VQVAE(d=16, latent_positions=2, code_dim=4, num_codes=16, hidden=32)
    >>> q = q.train(x, epochs=2, batch_size=64)
    >>> q.encode(x[:3]).shape, q.decode(q.encode(x[:3])).shape, q.code_size_bits
    ((3, 2), (3, 16), 8)
    """

    kind = "vqvae"

    def __init__(self, d: int = 64, latent_positions: int = 4, code_dim: int = 8,
                 num_codes: int = 64, hidden: int = 128, seed: int = 0,
                 commitment_weight: float = 0.25, decay: float = 0.99,
                 restart_after: int | None = 100):
        super().__init__(d)
        self.latent_positions = _positive_int("latent_positions", latent_positions)
        self.code_dim = _positive_int("code_dim", code_dim)
        self.num_codes = _positive_int("num_codes", num_codes)
        self.hidden = _positive_int("hidden", hidden)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed, self.commitment_weight, self.decay = seed, commitment_weight, decay
        self.restart_after = restart_after
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = _mlp([d, hidden, hidden, latent_positions * code_dim])
            self.decoder = _mlp([latent_positions * code_dim, hidden, hidden, d])
        self.codebook = VQCodebook(num_codes, code_dim, commitment_weight=commitment_weight,
                                   ema=True, decay=decay, restart_after=restart_after,
                                   init="data", seed=seed)
        self.mean = torch.zeros(d)
        self.scale = torch.ones(())
        self.history: list[dict] = []  # per epoch: loss, recon (standardized MSE), perplexity

    # ---- the interface -----------------------------------------------------------------
    @property
    def code_size_bits(self) -> int:
        return self.latent_positions * max(1, math.ceil(math.log2(self.num_codes)))

    def config(self) -> dict:
        return {"d": self.d, "latent_positions": self.latent_positions,
                "code_dim": self.code_dim, "num_codes": self.num_codes, "hidden": self.hidden,
                "seed": self.seed, "commitment_weight": self.commitment_weight,
                "decay": self.decay, "restart_after": self.restart_after}

    def state(self) -> dict[str, torch.Tensor]:
        """What encode and decode need: both MLPs, the codebook, the standardization (the
        codebook's EMA statistics are not kept: training after load restarts them)."""
        if not self.is_trained:
            return {}
        out = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        out.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        out.update({"codebook": self.codebook.weight.detach(), "mean": self.mean,
                    "scale": self.scale})
        return {k: v.detach().clone() for k, v in out.items()}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        t = dict(tensors)
        try:
            enc = {k[len("encoder."):]: t.pop(k) for k in list(t) if k.startswith("encoder.")}
            dec = {k[len("decoder."):]: t.pop(k) for k in list(t) if k.startswith("decoder.")}
            self.encoder.load_state_dict(enc)
            self.decoder.load_state_dict(dec)
            cb, mean, scale = t.pop("codebook"), t.pop("mean"), t.pop("scale")
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"VQVAE: tensors do not match the configuration: {e}") from e
        if t:
            raise ValueError(f"VQVAE: unexpected tensors {sorted(t)}")
        if cb.shape != (self.num_codes, self.code_dim) or mean.shape != (self.d,):
            raise ValueError(f"VQVAE: codebook {tuple(cb.shape)} / mean {tuple(mean.shape)} do "
                             f"not match the configuration")
        with torch.no_grad():
            self.codebook._set_codes(torch.arange(self.num_codes), cb.float())
            self.codebook.initialized.fill_(True)
        self.mean, self.scale = mean.float(), scale.float().reshape(())

    # ---- training ----------------------------------------------------------------------
    def _train(self, x: np.ndarray, epochs: int = 40, lr: float = 2e-3, batch_size: int = 64,
               verbose: bool = False, **kw) -> None:
        if kw:
            raise TypeError(f"VQVAE.train: unexpected arguments {sorted(kw)}")
        _positive_int("epochs", epochs)
        _positive_int("batch_size", batch_size)
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        xt = torch.from_numpy(x)
        self.mean = xt.mean(dim=0)
        self.scale = (xt - self.mean).std().clamp_min(1e-8).reshape(())
        xs = (xt - self.mean) / self.scale
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(self.seed + 1)
        self._modules_train(True)
        try:
            for epoch in range(epochs):
                tot = rec_tot = perp = 0.0
                nb = 0
                for idx in torch.randperm(len(xs), generator=gen).split(batch_size):
                    xb = xs[idx]
                    rec, vq_loss, _ = self._forward(xb)
                    recon = F.mse_loss(rec, xb)
                    loss = recon + vq_loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    tot, rec_tot = tot + loss.item(), rec_tot + recon.item()
                    perp, nb = perp + self.codebook.perplexity, nb + 1
                self.history.append({"epoch": epoch, "loss": tot / nb, "recon": rec_tot / nb,
                                     "perplexity": perp / nb})
                if verbose:
                    h = self.history[-1]
                    print(f"VQVAE epoch {epoch + 1}/{epochs}: loss {h['loss']:.4f}, "
                          f"recon {h['recon']:.4f}, perplexity {h['perplexity']:.1f}, "
                          f"restarts {self.codebook.restarts}")
        finally:
            self._modules_train(False)

    def _modules_train(self, mode: bool) -> None:
        for m in (self.encoder, self.codebook, self.decoder):
            m.train(mode)

    def _forward(self, xs: torch.Tensor):
        z = self.encoder(xs).reshape(-1, self.latent_positions, self.code_dim)
        z_q, codes, vq_loss = self.codebook(z)
        return self.decoder(z_q.reshape(len(xs), -1)), vq_loss, codes

    # ---- encode / decode ---------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, x: np.ndarray) -> np.ndarray:
        xs = (torch.from_numpy(x) - self.mean) / self.scale
        z = self.encoder(xs).reshape(-1, self.code_dim)
        return self.codebook.nearest(z).reshape(len(x), self.latent_positions).numpy()

    @torch.no_grad()
    def _decode(self, codes: Any) -> np.ndarray:
        c = torch.from_numpy(as_codes(codes, self.latent_positions, self.num_codes))
        z_q = self.codebook.weight[c].reshape(len(c), -1)
        out = self.decoder(z_q) * self.scale + self.mean
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)
