"""Block-wise codebook fine-tuning of vector-quantized layers (AQLM, Egiazarian et al. 2024,
"Extreme Compression of Large Language Models via Additive Quantization", section 3.4: after a
block's layers are quantized, the codes stay fixed and the continuous parameters are trained
by Adam so that the quantized block reproduces the float block's outputs).

Here: every :class:`~qkern.vq.linear.VQLinear` of a block has its codebooks (and scales, if
any) trained, in float32, by Adam at learning rate ``lr`` for ``steps`` steps to minimize the
mean squared error between the block's output and ``targets`` (the float block's outputs on
the same calibration inputs), one calibration batch per step, in order, cycling. Gradients
flow straight through the decode: the decoded weight is a gather of codebook rows (times the
scales), differentiable in the codebook entries and scales (while training, each layer's
``forward`` is replaced by a decode equal to :meth:`VQLinear.dequantize_weight`'s, with a
faster backward, then ``torch.nn.functional.linear``). Nothing else of the block is trained
(norms, biases and float layers stay as they are).

At the end the trained codebooks and scales are rounded to their storage dtype (float16) and
the block loss is measured again with the layers as stored; if it is not lower than before,
the original codebooks and scales are put back, so fine-tuning never makes a block worse on
the calibration loss. The codes are never changed.

>>> import torch
>>> from torch import nn
>>> from qkern.quantization import Batch
>>> from qkern.vq.linear import VQLinear
>>> g = torch.Generator().manual_seed(0)
>>> codes = torch.randint(0, 16, (8, 4), generator=g, dtype=torch.int64).to(torch.uint8)
>>> books = torch.randn(1, 16, 2, generator=g).half()
>>> block = nn.Sequential(VQLinear(codes, books, None, None, group_rows=8))
>>> x = torch.randn(64, 8, generator=g)
>>> target = x @ torch.randn(8, 8, generator=g).T * 0.1
>>> res = finetune_codebooks(block, [Batch((x,), {})], [target], steps=50, lr=1e-2)
>>> res.after < res.before, res.kept, block[0].codebooks.dtype
(True, False, torch.float16)
>>> torch.equal(block[0].codes, codes)
True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.vq import decode_vq
from ...vq.linear import VQLinear
from ..calibration import call_model
from ..registry import Batch, replace_module
from ..sequential import block_outputs

__all__ = ["FinetuneResult", "finetune_codebooks"]


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune_codebooks` returns: the mean block loss (MSE to the targets over
    the calibration batches) ``before`` and ``after`` (with the codebooks as stored at the
    end), whether the original codebooks were ``kept`` (fine-tuning did not lower the loss
    after rounding), the number of ``layers`` trained and the ``seconds`` taken."""

    before: float
    after: float
    kept: bool
    layers: int
    seconds: float


class _Decoding(nn.Module):
    """Stands in for a VQLinear while training: the same codes, trainable float32 codebooks
    (and scales); ``forward`` decodes the weight with :func:`qkern.ops.vq.decode_vq`, as
    :meth:`VQLinear.dequantize_weight` does."""

    def __init__(self, src: VQLinear):
        super().__init__()
        self.codes, self.group_rows = src.codes, src.group_rows
        self.codebooks = nn.Parameter(src.codebooks.detach().float().clone())
        self.scales = (None if src.scales is None
                       else nn.Parameter(src.scales.detach().float().clone()))
        self.bias = None if src.bias is None else src.bias.detach()

    def dequantize_weight(self) -> torch.Tensor:
        return decode_vq(self.codes, self.codebooks, self.scales, self.group_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _block_loss(block: nn.Module, inputs: list[Batch], targets: list[torch.Tensor]) -> float:
    """Mean over the batches of the MSE between the block's output and the target."""
    outs = block_outputs(block, inputs)
    return sum(float(F.mse_loss(o.float(), t.float())) for o, t in zip(outs, targets)) / len(outs)


def _check(block, inputs, targets, steps, lr) -> None:
    n = "finetune_codebooks: "
    if not isinstance(block, nn.Module):
        raise TypeError(f"{n}block must be an nn.Module, got {type(block).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{n}steps must be an int >= 0, got {steps!r}")
    if (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
            or lr <= 0):
        raise ValueError(f"{n}lr must be a finite number > 0, got {lr!r}")
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError(f"{n}inputs must be a non-empty list of calibration batches")
    if not isinstance(targets, (list, tuple)) or len(targets) != len(inputs):
        raise ValueError(f"{n}targets must be a list of one tensor per input batch "
                         f"({len(inputs)} batches)")


def finetune_codebooks(block: nn.Module, inputs: list[Batch], targets: list[torch.Tensor], *,
                       steps: int, lr: float = 1e-4) -> FinetuneResult:
    """Trains the codebooks and scales of every :class:`VQLinear` of ``block`` (in place) so
    that ``block`` on ``inputs`` (one :class:`Batch` per calibration batch) reproduces
    ``targets`` (one tensor each: the float block's outputs), as the module docstring says.
    The codes are not changed; the original codebooks are kept where training does not lower
    the loss measured after rounding."""
    _check(block, inputs, targets, steps, lr)
    t0 = time.perf_counter()
    layers = {n: m for n, m in block.named_modules() if isinstance(m, VQLinear)}
    before = _block_loss(block, inputs, targets)
    if not layers or steps == 0:
        return FinetuneResult(before, before, True, len(layers), time.perf_counter() - t0)
    flags = {p: p.requires_grad for p in block.parameters()}
    train = {n: _Decoding(m) for n, m in layers.items()}
    params = [p for d in train.values() for p in (d.codebooks, d.scales) if p is not None]
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for p in flags:
            p.requires_grad_(False)
        for n, d in train.items():
            replace_module(block, n, d)
        with torch.enable_grad():  # also when called under no_grad
            for step in range(steps):
                j = step % len(inputs)
                opt.zero_grad(set_to_none=True)
                out = _hidden(call_model(block, inputs[j]))
                F.mse_loss(out.float(), targets[j].float()).backward()
                opt.step()
    finally:
        for n, m in layers.items():
            replace_module(block, n, m)
        for p, f in flags.items():
            p.requires_grad_(f)
    old = {n: (m.codebooks.clone(), None if m.scales is None else m.scales.clone())
           for n, m in layers.items()}
    with torch.no_grad():
        for n, m in layers.items():
            m.codebooks.copy_(train[n].codebooks.to(m.codebooks.dtype))
            if m.scales is not None:
                m.scales.copy_(train[n].scales.to(m.scales.dtype))
    after = _block_loss(block, inputs, targets)
    kept = not after < before  # also when the loss went NaN
    if kept:
        with torch.no_grad():
            for n, m in layers.items():
                m.codebooks.copy_(old[n][0])
                if m.scales is not None:
                    m.scales.copy_(old[n][1])
        after = before
    return FinetuneResult(before, after, kept, len(layers), time.perf_counter() - t0)
