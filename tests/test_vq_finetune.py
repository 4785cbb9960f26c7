"""Codebook fine-tuning of GPTVQ blocks (qkern.quantization.algorithms.vq_finetune).

References written here: the decode of codes + codebooks + scales in numpy (from the format's
definition) and the tiny block's forward in float64 torch on those decoded weights, so the
block-output MSE is measured without the code under test."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import llm_models as LM
import qkern
from qkern.quantization import Batch, VQConfig
from qkern.quantization.algorithms.vq import VQQuantizer, vq_linear
from qkern.quantization.algorithms.vq_finetune import finetune_codebooks
from qkern.vq.linear import VQLinear


def _decode(layer: VQLinear) -> np.ndarray:
    """W[r, v*dim:(v+1)*dim] = scale(r, segment) * codebooks[r // group_rows, codes[r, v]]."""
    codes = layer.codes.numpy().astype(np.int64)
    books = layer.codebooks.float().numpy().astype(np.float64)
    out, nv = codes.shape
    dim = books.shape[2]
    w = np.zeros((out, nv * dim))
    for r in range(out):
        for v in range(nv):
            w[r, v * dim:(v + 1) * dim] = books[r // layer.group_rows, codes[r, v]]
    if layer.scales is not None:
        s = layer.scales.float().numpy().astype(np.float64)
        w *= np.repeat(s, nv * dim // s.shape[1], axis=1)
    return w


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 32))  # a float part (a norm's)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x * self.gain)))


def _reference_mse(block: Tiny, xs, targets) -> float:
    """Mean over batches of the MSE of the block's float64 forward on the decoded weights."""
    w1, w2 = (torch.from_numpy(_decode(m)) for m in (block.fc1, block.fc2))
    b1, b2 = block.fc1.bias.detach().double(), block.fc2.bias.detach().double()
    gain = block.gain.detach()
    tot = 0.0
    for x, t in zip(xs, targets):
        x = x.detach()
        h = torch.nn.functional.gelu((x * gain).double() @ w1.T + b1)
        tot += float(((h @ w2.T + b2) - t.double()).pow(2).mean())
    return tot / len(xs)


def _setup(seed=0, scale_group=None):
    """A float Tiny block, its calibration batches and float outputs, and its GPTVQ twin
    (k-means codebooks, no least-squares update: room for the fine-tuning)."""
    torch.manual_seed(seed)
    fl = Tiny()
    g = torch.Generator().manual_seed(seed + 1)
    mix = torch.randn(32, 32, generator=g) / 4
    xs = [torch.randn(24, 32, generator=g) @ mix + torch.randn(24, 32, generator=g)
          for _ in range(6)]
    with torch.no_grad():
        targets = [fl(x) for x in xs]
        x = torch.cat(xs)
        x = x * fl.gain
        h = torch.nn.functional.gelu(fl.fc1(x))
    q = copy.deepcopy(fl)
    q.fc1 = vq_linear(fl.fc1, x.T @ x / len(x),
                      VQConfig(bits=2, dim=2, group_rows=32, scale_group=scale_group,
                               update_codebooks=False))
    q.fc2 = vq_linear(fl.fc2, h.T @ h / len(h), VQConfig(bits=2, dim=2, scale_group=scale_group,
                                                         update_codebooks=False))
    return q, xs, targets


@pytest.mark.parametrize("scale_group,lr,ratio", [(None, 1e-3, 0.95), (16, 1e-2, 0.8)])
def test_finetuning_lowers_the_block_mse_codes_fixed(scale_group, lr, ratio):
    q, xs, targets = _setup(0, scale_group)
    before = copy.deepcopy(q)
    mse0 = _reference_mse(q, xs, targets)
    res = finetune_codebooks(q, [Batch((x,), {}) for x in xs], targets, steps=120, lr=lr)
    mse1 = _reference_mse(q, xs, targets)
    assert not res.kept and res.layers == 2
    assert mse1 < ratio * mse0, (mse0, mse1)
    assert res.before == pytest.approx(mse0, rel=1e-3)
    assert res.after == pytest.approx(mse1, rel=1e-3)
    for name in ("fc1", "fc2"):
        new, old = getattr(q, name), getattr(before, name)
        assert torch.equal(new.codes, old.codes) and new.codes.dtype == old.codes.dtype
        assert new.codebooks.dtype == torch.float16
        assert not torch.equal(new.codebooks, old.codebooks)
        assert torch.equal(new.bias, old.bias)
        if scale_group is not None:
            assert new.scales.dtype == torch.float16
            assert not torch.equal(new.scales, old.scales)
    assert isinstance(q.fc1, VQLinear) and isinstance(q.fc2, VQLinear)
    # only codebooks and scales train: the float gain is untouched, its flag restored
    assert torch.equal(q.gain, before.gain) and q.gain.requires_grad


def test_a_worse_result_is_not_kept():
    """A learning rate far too large makes the block worse: the GPTVQ codebooks stay."""
    q, xs, targets = _setup(1)
    before = copy.deepcopy(q)
    res = finetune_codebooks(q, [Batch((x,), {}) for x in xs], targets, steps=3, lr=5.0)
    assert res.kept and res.after == res.before
    for name in ("fc1", "fc2"):
        assert torch.equal(getattr(q, name).codebooks, getattr(before, name).codebooks)
    assert _reference_mse(q, xs, targets) == _reference_mse(before, xs, targets)


def test_zero_steps_change_nothing():
    q, xs, targets = _setup(2)
    before = copy.deepcopy(q)
    res = finetune_codebooks(q, [Batch((x,), {}) for x in xs], targets, steps=0)
    assert res.kept and res.before == res.after
    for (n, a), (_, b) in zip(q.state_dict().items(), before.state_dict().items()):
        assert torch.equal(a, b), n


def _buffers(model):
    return {n: t for n, t in model.state_dict().items() if ".layers." in n}


def test_pipeline():
    """finetune_steps=0 is the plain GPTVQ result bit for bit; with steps, block 0 (same
    inputs either way) keeps GPTVQ's codes, its codebooks change and stay float16, and each
    block's calibration loss does not rise."""
    model, cal = LM.build("llama"), LM.calibration(4, 16)
    base = VQConfig(bits=2, dim=2, kmeans_iters=5)
    plain = qkern.quantize_model(copy.deepcopy(model), base, cal, progress=False)
    zero = qkern.quantize_model(copy.deepcopy(model), VQConfig(bits=2, dim=2, kmeans_iters=5,
                                                               finetune_steps=0),
                                cal, progress=False)
    a, b = _buffers(plain), _buffers(zero)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    quantizer = VQQuantizer(VQConfig(bits=2, dim=2, kmeans_iters=5, finetune_steps=40,
                                     finetune_lr=1e-3))
    ft = qkern.quantization.quantize_sequential(model, quantizer, cal)
    assert set(quantizer.finetuned) == {"model.layers.0", "model.layers.1"}
    for name, res in quantizer.finetuned.items():
        assert res.after <= res.before and res.layers == 7, (name, res)
    assert not quantizer.finetuned["model.layers.0"].kept
    layers0 = [n for n, m in ft.named_modules() if isinstance(m, VQLinear)
               and n.startswith("model.layers.0.")]
    assert len(layers0) == 7
    changed = 0
    for n in layers0:
        m, p = ft.get_submodule(n), plain.get_submodule(n)
        assert torch.equal(m.codes, p.codes), n
        assert m.codebooks.dtype == torch.float16
        changed += not torch.equal(m.codebooks, p.codebooks)
    assert changed == 7


@pytest.mark.parametrize("kw,match", [
    ({"finetune_steps": -1}, "finetune_steps must be an int >= 0"),
    ({"finetune_steps": 2.5}, "finetune_steps must be an int >= 0"),
    ({"finetune_lr": 0}, "finetune_lr must be a learning rate in"),
    ({"finetune_lr": -1e-3}, "finetune_lr must be"),
    ({"finetune_lr": math.nan}, "finetune_lr must be"),
    ({"finetune_lr": 2.0}, "finetune_lr must be"),
    ({"finetune_lr": True}, "finetune_lr must be"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        VQConfig(**kw)


def test_bad_arguments():
    q, xs, targets = _setup(3)
    batches = [Batch((x,), {}) for x in xs]
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        finetune_codebooks(q, batches, targets, steps=-1)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        finetune_codebooks(q, batches, targets, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="one tensor per input batch"):
        finetune_codebooks(q, batches, targets[:2], steps=1)
    with pytest.raises(ValueError, match="non-empty list"):
        finetune_codebooks(q, [], [], steps=1)
    with pytest.raises(TypeError, match="nn.Module"):
        finetune_codebooks("block", batches, targets, steps=1)
