"""Issue 9, "Other": QuantLinear with one activation scale (int8_dynamic_tensor, int8_static) on
an empty batch returns (0, N) like every other kernel, and symmetric dynamic quantization
allocates no zero-point array."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkern
from qkern.nn import QuantLinear

OPS = torch.ops.qkern


@pytest.mark.parametrize("act,kw", [("int8_dynamic_tensor", {}),
                                    ("int8_static", {"act_scale": 0.05}),
                                    ("int8_dynamic", {}), ("none", {})])
@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 2)])
def test_empty_batch(act, kw, lead):
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_float(lin, "int8", group_size=None, act=act, **kw)
    x = torch.zeros(*lead, 64)
    y = q(x)  # raised "group_size must be positive" for the one-scale kernels
    ref = F.linear(x, q.dequantize_weight(), lin.bias)
    assert y.shape == ref.shape == (*lead, 8) and y.dtype == torch.float32


@pytest.mark.parametrize("rule", ["absmax", "pow2_mx", "meanabs"])
def test_symmetric_dynamic_returns_no_zero_points(rule):
    rid = qkern._C.SCALE_RULES[rule]
    x = torch.randn(64, 32)
    codes, scale, zp = OPS.quantize_affine_dynamic(x.reshape(-1), 32, -8, 7, rid, 7.0, 2, 0, 0,
                                                   0.0, 0)
    assert zp.numel() == 0 and scale.numel() == 64
    # the min/max rule still returns one zero point per group
    _, _, zp2 = OPS.quantize_affine_dynamic(x.reshape(-1), 32, -8, 7,
                                            qkern._C.SCALE_RULES["minmax"], 7.0, 2, 0, 0, 0.0, 0)
    assert zp2.numel() == 64 and zp2.dtype == torch.int32


def test_symmetric_per_channel_quantize_values():
    """The codes / scales are unchanged (numpy reference), and there is no zero point."""
    x = torch.randn(16, 1) * 3
    q = qkern.quantize(x, "int8", granularity="channel")
    amax = x.abs().numpy()[:, 0]
    assert q.zero_point is None
    assert torch.equal(q.scale.reshape(-1), torch.from_numpy(amax / 127).float())


_PEAK = """
import resource, sys, torch, qkern
x = torch.randn(2**24, 1)
torch.ops.qkern.quantize_affine_dynamic(x.reshape(-1)[:64], 1, -128, 127, 0, 127.0, 0, 0, 0,
                                        0.0, 0)  # warm up (lazy initialisation)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
q = qkern.quantize(x, "int8", granularity="channel")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_symmetric_per_channel_peak_memory():
    """(2**24, 1) per channel: results are 16 MiB of codes + 64 MiB of scales; the int32 zero
    points (64 MiB more) are not allocated. Peak growth measured in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True,
                         check=True)
    grew = float(out.stdout.split()[-1])
    assert grew < 80 + 32, grew  # results + slack; with the zero points it was 144 MiB
