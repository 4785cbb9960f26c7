"""GPTVQ (van Baalen et al., 2024, "GPTVQ: The Blessing of Dimensionality for LLM
Quantization"): vector quantization of LLM weights with GPTQ's error feedback.

Each row of a Linear's weight ``W`` (out, in) is cut into vectors of ``dim`` consecutive input
elements; each group of ``group_rows`` output rows (or the whole layer) has one codebook of
``2^(bits * dim)`` entries (``bits`` per weight in the codes), learned by weighted k-means
(:class:`qkern.vq.KMeans`) on the group's vectors, each vector weighted by the mean Hessian
diagonal ``H_jj`` of its columns (times its scale squared). Optional scales: one per row and
segment of ``scale_group`` input columns (the segment's largest magnitude, float16), the
vectors divided by it before the codebook.

Then GPTQ's sweep, ``dim`` columns at a time. With ``H = 2 X^T X / N`` (damped) and ``U`` the
upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), the OBS loss of fixing the columns
``B = j .. j + dim - 1`` at ``Q_B`` while the later ones stay free is
``||(W_B - Q_B) U_BB^-1||^2 / 2`` per row (``[H_F^-1]_BB = U_BB^T U_BB`` for the columns
``F`` from ``j`` on), so each vector takes the codebook entry nearest in the metric
``A = U_BB^-1``: the nearest entry of ``c A`` to ``w A``
(:func:`qkern.vq.search.assign_grouped`); the error ``E = (W_B - Q_B) A`` updates the later
columns ``W_F -= E U_{B, F}`` (exactly GPTQ's update, lazily in blocks of ``block_size``
columns). With ``H`` a multiple of the identity it is the plain nearest assignment. Last
(``update_codebooks``, GPTVQ's codebook update, here in closed form): the codes fixed, each
codebook is replaced by the least-squares minimizer of ``tr((W - Q) H (W - Q)^T)`` over its
rows, then rounded to float16.

Lattice codebooks (``codebook="d4"`` or ``"e8"``): instead of k-means, the one codebook of
every layer is the Voronoi code of the lattice D4 (``dim=4``) or E8 (``dim=8``) with
``r = 2^bits`` (``bits`` an integer: ``r^dim`` entries, all of them; centred:
:func:`qkern.vq.lattice.lattice_codebook` with ``centered=True``), fixed (no k-means, no
codebook update), times the per-row segment scales, which are then required. Each scale is
searched, not taken from the largest magnitude: of 21 candidates ``t * rms(segment) /
rms(codebook)``, ``t`` log-spaced in [0.5, 2], the one (float16) minimizing the
Hessian-diagonal-weighted error ``sum_j H_jj (w_j - s q_j)^2`` of the segment's weights
rounded to the code (the nearest lattice point, overloads clipped radially:
:class:`qkern.vq.LatticeQuantizer`), before the sweep. The codebook is implicit
(regenerable from the lattice and ``bits``), so it is not counted in the bits per weight.

The quantized layer is a :class:`qkern.vq.linear.VQLinear` (codes + float16 codebooks +
scales; decoded weight through ``torch.nn.functional.linear``). Bits per weight:
``bits + (groups * 2^(bits * dim) * dim * 16 + scales * 16) / (out * in)`` (lattice codebooks:
``bits + scales * 16 / (out * in)``).

>>> import torch
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> w, x = torch.randn(64, 32), torch.randn(256, 32)
>>> res = vq_quantize(w, x.T @ x / 256, bits=2, dim=2)
>>> res.codes.shape, res.codebooks.shape, res.codes.dtype
(torch.Size([64, 16]), torch.Size([1, 16, 2]), torch.uint8)
>>> round(vq_linear_from(res, None).bits_per_weight, 4)  # 2 + 16 * 2 * 16 / 2048
2.25
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...vq.lattice import lattice_codebook
from ...vq.linear import MODES, VQLinear
from ...vq.search import assign_grouped
from ..registry import (
    BaseConfig,
    check_bool,
    check_choice,
    check_int,
    check_real,
    config_class,
    fail,
    register_quantizer,
)
from ..sequential import BlockContext, SequentialQuantizer
from .vq_codebooks import codebooks_kmeans, lattice_scales, max_scales
from .vq_finetune import FinetuneResult, finetune_codebooks

__all__ = ["VQConfig", "VQQuantizer", "VQResult", "model_bits_per_weight", "vq_linear",
           "vq_linear_from", "vq_quantize"]

DIMS = (1, 2, 4, 8)
#: the largest learned codebook: 2^12 entries
MAX_INDEX_BITS = 12
#: the largest lattice codebook: 2^16 entries (E8 at 2 bits per weight)
MAX_LATTICE_INDEX_BITS = 16
#: ``VQConfig.codebook`` choices; lattice name -> its dimension
CODEBOOKS = ("learned", "d4", "e8")
LATTICE_DIMS = {"d4": 4, "e8": 8}
CODEBOOK_DTYPES = {"float16": torch.float16, "float32": torch.float32}

log = logging.getLogger("qkern.vq")


@config_class
@dataclass
class VQConfig(BaseConfig):
    """GPTVQ weight-only vector quantization (module docstring): ``bits`` per weight in the
    codes (fractional where ``bits * dim`` is an integer: 2.5 at dim 2), vectors of ``dim``
    input elements (codebooks of ``2^(bits * dim)`` entries, at most 2^12), one codebook per
    ``group_rows`` output rows (None: per layer), optional scales per row and ``scale_group``
    input columns, codebooks stored as ``codebook_dtype``. Layers whose input size ``dim``
    does not divide stay float (noted); where ``scale_group`` does not divide it, one scale
    per row (noted). ``codebook``: "learned" (k-means, GPTVQ) or a fixed lattice code, "d4"
    (``dim=4``) or "e8" (``dim=8``), integer ``bits``, ``scale_group`` required, ``group_rows``
    None; the lattice codebook is implicit and not counted in the bits per weight.
    ``finetune_steps`` > 0: after each block's layers are quantized, their codebooks (and
    scales) are trained by Adam at ``finetune_lr`` for that many steps on the block-output MSE
    to the float block, codes fixed (AQLM's block-wise fine-tuning: :mod:`.vq_finetune`); 0
    (the default) is off."""

    bits: float = 2
    dim: int = 2
    group_rows: int | None = None
    scale_group: int | None = None
    codebook_dtype: str = "float16"
    damp_percent: float = 0.01
    block_size: int = 128
    kmeans_iters: int = 25
    seed: int = 0
    update_codebooks: bool = True
    true_sequential: bool = True
    codebook: str = "learned"
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    mode: str = "exact"

    FORMAT_FIELD: ClassVar[str] = "bits"

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_vq_args(n + ".", self.bits, self.dim, self.group_rows, self.scale_group,
                      self.codebook_dtype, self.codebook)
        check_real(n, "damp_percent", self.damp_percent, 0.0, 1.0, "a number in [0, 1]")
        check_int(n, "block_size", self.block_size, 1)
        check_int(n, "kmeans_iters", self.kmeans_iters, 0)
        check_int(n, "seed", self.seed, 0)
        check_bool(n, "true_sequential", self.true_sequential)
        check_bool(n, "update_codebooks", self.update_codebooks)
        check_choice(n, "mode", self.mode, MODES)
        check_int(n, "finetune_steps", self.finetune_steps, 0)
        lr = self.finetune_lr
        if (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 1
                or lr != lr):
            fail(n, "finetune_lr", "a learning rate in (0, 1]", lr)
        super().__post_init__()

    @property
    def group_size(self) -> None:
        """No scalar groups (the pipeline's messages name it)."""
        return None


def index_bits(bits, dim) -> int:
    """Bits of one code: ``bits * dim`` (an integer)."""
    return int(round(bits * dim))


def check_vq_args(prefix: str, bits, dim, group_rows, scale_group, codebook_dtype,
                  codebook: str = "learned") -> None:
    """The shape arguments of VQ: clear ValueErrors (``prefix`` names the caller). ``bits``
    may be fractional (2.5 with dim 2: 32-entry codebooks) as long as ``bits * dim`` is an
    integer; a lattice ``codebook`` needs integer bits, its lattice's dim and scales."""
    name = prefix.rstrip(".: ")
    check_choice(name, "codebook", codebook, CODEBOOKS)
    if codebook in LATTICE_DIMS:
        _check_lattice_args(prefix, bits, dim, group_rows, scale_group, codebook)
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 8:
        fail(name, "bits", "a number in (0, 8]", bits)
    if dim not in DIMS or isinstance(dim, bool):
        fail(name, "dim", f"one of {DIMS}", dim)
    if abs(bits * dim - round(bits * dim)) > 1e-9 or round(bits * dim) < 1:
        raise ValueError(f"{prefix} bits * dim = {bits} * {dim} must be a positive integer "
                         "(the bits of one code)")
    if codebook == "learned" and index_bits(bits, dim) > MAX_INDEX_BITS:
        raise ValueError(f"{prefix} bits * dim = {bits} * {dim} = {bits * dim:g} asks for "
                         f"codebooks of 2^{bits * dim:g} entries; at most 2^{MAX_INDEX_BITS} "
                         "(lower bits or dim)")
    if group_rows is not None:
        check_int(name, "group_rows", group_rows, 1)
    if scale_group is not None:
        check_int(name, "scale_group", scale_group, 1)
        if scale_group % dim:
            raise ValueError(f"{prefix} scale_group={scale_group} is not a multiple of "
                             f"dim={dim}")
    check_choice(name, "codebook_dtype", codebook_dtype, tuple(CODEBOOK_DTYPES))


def _check_lattice_args(prefix, bits, dim, group_rows, scale_group, codebook) -> None:
    ld = LATTICE_DIMS[codebook]
    if dim != ld:
        raise ValueError(f"{prefix} codebook={codebook!r} is a {ld}-dimensional lattice: it "
                         f"needs dim={ld}, got dim={dim!r}")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits != int(bits) or (
            not 1 <= bits * ld <= MAX_LATTICE_INDEX_BITS):
        raise ValueError(f"{prefix} codebook={codebook!r} needs an integer bits with "
                         f"bits * {ld} <= {MAX_LATTICE_INDEX_BITS} (a Voronoi code of "
                         f"2^(bits * {ld}) points), got bits={bits!r}")
    if scale_group is None:
        raise ValueError(f"{prefix} codebook={codebook!r} is a fixed lattice code: it needs "
                         "scales; set scale_group (e.g. the input size: one scale per row)")
    if group_rows is not None:
        raise ValueError(f"{prefix} codebook={codebook!r} is one fixed code for every row: "
                         f"group_rows must be None, got {group_rows!r}")


@dataclass(frozen=True)
class VQResult:
    """What :func:`vq_quantize` returns: ``weight`` (out, in) float32 the decoded weight;
    ``codes`` (out, in / dim) uint8 / uint16; ``codebooks`` (groups, k, dim) in the storage
    dtype; ``scales`` None or (out, in / scale_group) float16; ``group_rows``; ``loss``
    ``tr((W - Q) H (W - Q)^T) / 2`` on the damped ``H = 2 X^T X / N``; ``sweep_loss`` the
    sweep's OBS losses ``sum ||E||^2 / 2`` (equal to ``loss`` before the codebook update);
    ``codebook`` the :class:`VQConfig` choice ("learned", "d4", "e8")."""

    weight: torch.Tensor
    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor | None
    group_rows: int
    loss: float
    sweep_loss: float = float("nan")
    codebook: str = "learned"


def _check_inputs(w, gram, bits, dim, group_rows, scale_group, codebook_dtype,
                  codebook) -> None:
    n = "vq_quantize: "
    if not isinstance(w, torch.Tensor) or not isinstance(gram, torch.Tensor):
        raise TypeError(f"{n}w and gram must be torch tensors")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{n}w must be a 2-D float (out, in) matrix, got {w.dim()}-D {w.dtype}")
    out, k = w.shape
    if tuple(gram.shape) != (k, k) or not gram.is_floating_point():
        raise ValueError(f"{n}gram must be a float ({k}, {k}) matrix for w of shape "
                         f"{tuple(w.shape)}, got {tuple(gram.shape)} {gram.dtype}")
    if not bool(torch.isfinite(w).all()) or not bool(torch.isfinite(gram).all()):
        raise ValueError(f"{n}w and gram must be finite (NaN or Inf found)")
    if bool((gram.diagonal() < 0).any()):
        raise ValueError(f"{n}gram has a negative diagonal entry: it must be X^T X / N")
    check_vq_args(n, bits, dim, group_rows, scale_group, codebook_dtype, codebook)
    if k % dim:
        raise ValueError(f"{n}dim={dim} does not divide in_features={k}")
    if scale_group is not None and k % scale_group:
        raise ValueError(f"{n}scale_group={scale_group} does not divide in_features={k}")
    rows = out if group_rows is None else min(group_rows, out)
    smallest = (out % rows or rows) * (k // dim)
    nb = index_bits(bits, dim)
    if codebook == "learned" and smallest < 2 ** nb:
        raise ValueError(f"{n}a group of rows holds {smallest} vectors, fewer than the "
                         f"2^{nb} = {2 ** nb} codebook entries; raise "
                         "group_rows or lower bits * dim")


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """``U`` upper with ``H^-1 = U^T U`` (GPTQ's reference: Cholesky of the inverse)."""
    lo, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError("vq_quantize: H + damping is not positive definite (gram must be "
                         "X^T X / N of the layer's inputs; a larger damp_percent helps)")
    return torch.linalg.cholesky(torch.cholesky_inverse(lo), upper=True)


def vq_quantize(w: torch.Tensor, gram: torch.Tensor, *, bits: float = 2, dim: int = 2,
                group_rows: int | None = None, scale_group: int | None = None,
                codebook_dtype: str = "float16", damp_percent: float = 0.01,
                block_size: int = 128, kmeans_iters: int = 25, seed: int = 0,
                update_codebooks: bool = True, feedback: bool = True,
                codebook: str = "learned") -> VQResult:
    """GPTVQ of ``w`` (out, in) given ``gram = X^T X / N`` (in, in) of the layer's inputs
    (module docstring). ``feedback=False``: the plain nearest assignment (no error feedback)
    with the k-means codebooks, for comparison (no codebook update). ``codebook``: "learned"
    or a fixed lattice code ("d4", "e8"; ``kmeans_iters`` and ``update_codebooks`` unused)."""
    _check_inputs(w, gram, bits, dim, group_rows, scale_group, codebook_dtype, codebook)
    check_real("vq_quantize", "damp_percent", damp_percent, 0.0, 1.0, "a number in [0, 1]")
    check_int("vq_quantize", "block_size", block_size, 1)
    check_int("vq_quantize", "kmeans_iters", kmeans_iters, 0)
    check_bool("vq_quantize", "feedback", feedback)
    check_bool("vq_quantize", "update_codebooks", update_codebooks)
    out, n_in = w.shape
    rows = out if group_rows is None else min(group_rows, out)
    k = 2 ** index_bits(bits, dim)
    with torch.no_grad():
        w0 = w.detach().float().clone()
        h = gram.detach().double() * 2.0
        dead = h.diagonal() == 0
        if bool(dead.any()):
            h[dead, dead] = 1.0
            w0[:, dead] = 0.0
        h.diagonal().add_(damp_percent * h.diagonal().mean())
        u = _upper_inverse_cholesky(h).float()
        lattice = codebook in LATTICE_DIMS
        if lattice:
            cb = torch.from_numpy(lattice_codebook(codebook.upper(), int(bits), centered=True))
            books = cb[None].to(CODEBOOK_DTYPES[codebook_dtype])
            scales = lattice_scales(w0, h.diagonal().float(), scale_group, codebook, int(bits),
                                     cb.float())
        else:
            scales = max_scales(w0, scale_group)
        sfull = None if scales is None else scales.float().repeat_interleave(scale_group, 1)
        wn = w0 if sfull is None else w0 / sfull
        if not lattice:
            books = codebooks_kmeans(wn, h.diagonal().float(), sfull, dim, k, rows, kmeans_iters,
                               seed, CODEBOOK_DTYPES[codebook_dtype])
        codes, q, sweep_loss = _sweep(w0, u, books.float(), sfull, dim, rows, block_size,
                                      feedback)
        if update_codebooks and feedback and not lattice:
            books = _update_codebooks(w0, h, codes, books, sfull, rows)
            q = _decoded(codes, books.float(), sfull, rows)
        d = (w0 - q).double()
        loss = 0.5 * float(((d @ h) * d).sum())
    cdt = torch.uint8 if index_bits(bits, dim) <= 8 else torch.uint16
    return VQResult(q, codes.to(cdt), books, scales, rows, loss, sweep_loss, codebook)


def _decoded(codes, books, sfull, rows):
    """``W`` from codes (out, in / dim) int64, codebooks (groups, k, dim), scales."""
    out = codes.shape[0]
    g = torch.arange(out) // rows
    q = books[g[:, None], codes].reshape(out, -1)
    return q if sfull is None else q * sfull


def _update_codebooks(w0, h, codes, books, sfull, rows):
    """GPTVQ's codebook update: with the codes fixed, each group's codebook ``C`` minimizing
    ``tr((W - Q) H (W - Q)^T)`` over its rows (``Q`` linear in ``C``): the normal equations
    ``M vec(C) = b``, ``M[(a,i),(b,j)] = sum_r sum_{v: c_rv = a} sum_{u: c_ru = b}
    s_rv s_ru H[v d + i, u d + j]``, ``b[(a,i)] = sum_{r, v: c_rv = a} s_rv (W H)[r, v d + i]``;
    a tiny ridge towards the old codebook keeps unused entries where they were."""
    out, n_in = w0.shape
    n_groups, k, dim = books.shape
    kd = k * dim
    hd = h.double()
    wh = w0.double() @ hd
    sf = torch.ones(out, n_in, dtype=torch.float64) if sfull is None else sfull.double()
    new = []
    for gi in range(n_groups):
        r0, r1 = gi * rows, min(out, (gi + 1) * rows)
        pos = (codes[r0:r1, :, None] * dim + torch.arange(dim)).reshape(r1 - r0, n_in)
        m = torch.zeros(kd * kd, dtype=torch.float64)
        for r in range(r0, r1, 16):  # chunks of 16 rows: (16, in, in) scatter indices
            e = min(r + 16, r1)
            p, s = pos[r - r0:e - r0], sf[r:e]
            idx = (p[:, :, None] * kd + p[:, None, :]).reshape(-1)
            m.index_add_(0, idx, (s[:, :, None] * s[:, None, :] * hd).reshape(-1))
        m = m.reshape(kd, kd)
        b = torch.zeros(kd, dtype=torch.float64)
        b.index_add_(0, pos.reshape(-1), (sf[r0:r1] * wh[r0:r1]).reshape(-1))
        old = books[gi].double().reshape(-1)
        lam = 1e-6 * float(m.diagonal().mean()) + 1e-30
        m.diagonal().add_(lam)
        c = torch.linalg.solve(m, b + lam * old)
        new.append(c.reshape(k, dim))
    return torch.stack(new).to(books.dtype)


def _sweep(w0, u, books, sfull, dim, rows, block_size, feedback):
    """The column sweep, ``dim`` columns at a time (module docstring)."""
    out, n_in = w0.shape
    bs = max(dim, block_size // dim * dim)
    wk = w0.clone()
    codes = torch.empty(out, n_in // dim, dtype=torch.int64)
    q = torch.empty_like(w0)
    loss = 0.0
    grp = torch.arange(out) // rows
    for i1 in range(0, n_in, bs):
        i2 = min(i1 + bs, n_in)
        errs = torch.empty(out, i2 - i1)
        for j in range(i1, i2, dim):
            b = slice(j, j + dim)
            a = torch.linalg.solve_triangular(u[b, b], torch.eye(dim), upper=True)
            if not feedback:
                a = torch.eye(dim)
            wb = wk[:, b]
            sb = None if sfull is None else sfull[:, j:j + 1]
            xn = wb if sb is None else wb / sb
            idx, _ = assign_grouped((xn @ a).numpy(), (books @ a).numpy(), rows)
            idx = torch.from_numpy(idx)
            codes[:, j // dim] = idx
            q[:, b] = books[grp, idx]
            if sb is not None:
                q[:, b] *= sb
            if feedback:
                e = (wb - q[:, b]) @ a
                errs[:, j - i1:j - i1 + dim] = e
                loss += 0.5 * float(e.double().square().sum())
                if j + dim < i2:
                    wk[:, j + dim:i2] -= e @ u[b, j + dim:i2]
        if feedback and i2 < n_in:
            wk[:, i2:] -= errs @ u[i1:i2, i2:]
    if not feedback:
        loss = float("nan")
    return codes, q, loss


def vq_linear_from(res: VQResult, bias: torch.Tensor | None, mode: str = "exact") -> VQLinear:
    """The :class:`VQLinear` of a :func:`vq_quantize` result (its weight decodes to
    ``res.weight``), running in ``mode``."""
    b = None if bias is None else bias.detach()
    lattice = res.codebook.upper() if res.codebook in LATTICE_DIMS else None
    return VQLinear(res.codes, res.codebooks, res.scales, b, res.group_rows, lattice=lattice,
                    mode=mode)


def vq_linear(linear: nn.Linear, gram: torch.Tensor, cfg: VQConfig) -> VQLinear:
    """A :class:`VQLinear` holding the GPTVQ-quantized weight of ``linear`` (bias kept);
    ``gram`` is ``X^T X / N`` of its inputs."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"vq_linear expects an nn.Linear, got {type(linear).__name__}")
    if not isinstance(cfg, VQConfig):
        raise TypeError(f"vq_linear expects a VQConfig, got {type(cfg).__name__}")
    res = vq_quantize(linear.weight, gram, bits=cfg.bits, dim=cfg.dim,
                      group_rows=cfg.group_rows, scale_group=cfg.scale_group,
                      codebook_dtype=cfg.codebook_dtype, damp_percent=cfg.damp_percent,
                      block_size=cfg.block_size, kmeans_iters=cfg.kmeans_iters, seed=cfg.seed,
                      update_codebooks=cfg.update_codebooks, codebook=cfg.codebook)
    return vq_linear_from(res, linear.bias, cfg.mode)


def model_bits_per_weight(model: nn.Module) -> tuple[int, int]:
    """(total bits, weights) over the :class:`VQLinear` layers of ``model``."""
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, VQLinear):
            bits += m.code_bits + m.overhead_bits
            weights += m.in_features * m.out_features
    return bits, weights


@register_quantizer(VQConfig)
class VQQuantizer(SequentialQuantizer):
    """GPTVQ in the block-by-block pipeline: each linear is vector-quantized with the Gram
    matrix of its inputs measured on the partially quantized block (as GPTQ); with
    ``finetune_steps`` the block's codebooks are then fine-tuned (``finetuned[block name]``:
    the :class:`~.vq_finetune.FinetuneResult`)."""

    GRAMS = True
    NEEDS_DATA = True
    CONSTRAINTS_REFUSAL = ("its weights are codebook entries, not a scaled integer grid: "
                           "power-of-two scales, zero points and an integer accumulator "
                           "bound do not apply (docs/hardware.md)")

    def __init__(self, config):
        super().__init__(config)
        self.finetuned: dict[str, FinetuneResult] = {}

    def not_distributed(self) -> str | None:
        """The Gram matrices are all-reduced (the base class); the codebook fine-tuning is
        not data-parallel."""
        if self.config.finetune_steps:
            return "finetune_steps > 0: the codebook fine-tuning is not data-parallel"
        return None

    def quantize_block(self, ctx: BlockContext, log_layer) -> None:
        """GPTQ-style layer by layer (the base class), then the codebook fine-tuning (the
        float block's outputs are taken before the first layer is quantized)."""
        steps = self.config.finetune_steps
        targets = ctx.float_outputs if steps and ctx.inputs and ctx.layers else None
        super().quantize_block(ctx, log_layer)
        if targets is None:
            return
        res = finetune_codebooks(ctx.block, ctx.inputs, targets, steps=steps,
                                 lr=self.config.finetune_lr)
        self.finetuned[ctx.name] = res
        msg = (f"{ctx.name} codebook fine-tuning: loss {res.before:.4e} -> {res.after:.4e}"
               f" ({steps} steps, {res.layers} layers, {res.seconds:.2f} s)"
               + ("; no gain, GPTVQ codebooks kept" if res.kept else ""))
        log.info(msg)
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def preflight(self, name: str, linear: nn.Linear, cfg) -> str | None:
        k = linear.in_features
        if k % cfg.dim:
            return f"dim={cfg.dim} does not divide its input size {k}"
        rows = linear.out_features if cfg.group_rows is None else cfg.group_rows
        entries = 2 ** index_bits(cfg.bits, cfg.dim)
        if cfg.codebook == "learned" and min(rows, linear.out_features) * (k // cfg.dim) < entries:
            return "a group of rows holds fewer vectors than the codebook has entries"
        return None

    def quantize_layer(self, name: str, linear: nn.Linear, gram: torch.Tensor | None,
                       cfg) -> nn.Module:
        if gram is None:
            raise ValueError(f"{name}: VQ needs the Gram matrix X^T X / N of the layer's "
                             "calibration inputs")
        k = linear.in_features
        if cfg.scale_group is not None and k % cfg.scale_group:
            self.notes[name] = (f"scale_group {cfg.scale_group} does not divide its input size "
                                f"{k}: one scale per row")
            cfg = dataclasses.replace(cfg, scale_group=k)
        return vq_linear(linear, gram, cfg)

