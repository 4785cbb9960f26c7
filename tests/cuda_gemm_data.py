"""What the CUDA matmul tests share: running an op emulated or on the GPU, bit and bound
comparisons, activations and int4 weights. Imported after the tests' importorskip of
qkern._cuda."""

from __future__ import annotations

import pytest
import torch

import qkern
import qkern.ops.w4 as W4
from qkern import _cuda
from qkern.ops import cuda as C

OPS = torch.ops.qkern
U = 2.0 ** -24
HAS_GPU = torch.cuda.is_available() and _cuda.device_count() > 0
gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
WHERE = ["emu", pytest.param("cuda", marks=gpu)]
PATHS = ["auto", "gemv", "gemm"]
ISAS = ["scalar"] + (["avx2"] if qkern._C.cpu_has_avx2() else [])



def to_device(t):
    return t.cuda() if isinstance(t, torch.Tensor) else t


def run(where: str, op: str, *args, path="auto", reverse=False):
    """The CUDA implementation of ``op``: emulated on the host, or on the GPU (result on CPU)."""
    if where == "emu":
        return C.emulate(op, *args, path=path, reverse=reverse)
    return C.run_matmul(op, *(to_device(a) for a in args), path=path).cpu()


def same_bits(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Equal bit for bit, every NaN counting as equal to every NaN."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape)
    g, r = got.float().reshape(-1), ref.float().reshape(-1)
    nan = torch.isnan(g)
    assert torch.equal(nan, torch.isnan(r)), f"{what}: NaN positions differ"
    bad = (g.view(torch.int32) != r.view(torch.int32)) & ~nan
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ, first at {i}: "
                             f"{g[i].item()!r} vs cpu {r[i].item()!r}")


def within(got, ref64, bound, what=""):
    err = (got.double() - ref64).abs()
    worst = float((err - bound).max()) if err.numel() else 0.0
    assert worst <= 0, f"{what}: error exceeds the bound by {worst:.3g}"


def make_x(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Normal rows of different magnitudes, a zero row, a row with a subnormal half and a huge
    half (fast-mode blocks with d < FLT_MIN and large d), exact quarter values (rounding ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(20).add(0.1)
    if m > 1:
        x[1] = 0.0
    if m > 2:
        x[2, : k // 2] = 1e-40
        x[2, k // 2:] *= 1e15
    flat = x.view(-1)
    flat[::17] = torch.round(flat[::17] * 4) / 4
    return x


def make_w4(n, k, group, asym, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, k // group, generator=g) + 0.05) * 0.1
    z = torch.randint(-8, 8, (n, k // group), dtype=torch.int32, generator=g) if asym else None
    return q, s, z, W4.pack_weight(q, s, z, group)


def w4_args(w, bias, n, k, group, mode):
    return (w["packed"], w["scales"], w["zeros"], bias, n, k, group, mode)
