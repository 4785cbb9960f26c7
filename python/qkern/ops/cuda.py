"""CUDA kernels of the qkern:: ops: the quantized matmuls (``gemm_w4``, ``gemm_lut4``,
``gemm_w8a8``, ``gemm_w8a16``) here, the element-wise ops in ``cuda_quant.py``; all registered
for the CUDA dispatch key below. Without ``qkern._cuda`` the registered kernels raise a
RuntimeError saying so.

The matmuls run on the packed buffers of the CPU ops unchanged, with the argument checks of
``checks.py``; what each guarantees relative to the CPU op is in docs/numerics.md "CUDA
matmuls". ``emulate(op, *args)`` runs the same CUDA implementation on the host (every kernel
thread by thread, over CPU tensors) for tests without a GPU.
"""

from __future__ import annotations

import math

import torch

from . import checks
from .cuda_quant import IMPLS as ELEMENTWISE
from .cuda_quant import NonFiniteError, addr, as_device, stream
from .lut4 import cuda_group_error
from .schemas import LIB

try:
    from .. import _cuda
except ImportError:  # built without nvcc: the kernels registered below say so
    _cuda = None

__all__ = ["emulate", "run_matmul"]

# ---- quantized matmuls ------------------------------------------------------------------------

_PATHS = {"auto": 0, "gemv": 1, "gemm": 2}
_W8A8_MAX_K = 132104  # K * 127 * 128 <= 2^31 - 1


class _Runner:
    """Where a matmul runs: on the main tensor's CUDA device, or (``emulate``) on the host
    through the ``emulate_*`` twins of the launchers. ``path``: 0 auto, 1 GEMV, 2 GEMM."""

    def __init__(self, emulate: bool = False, path: int = 0, reverse: bool = False):
        if path not in _PATHS.values():
            raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
        self.emulate, self.path, self.reverse = emulate, path, reverse

    def main(self, t: torch.Tensor, what: str) -> torch.device:
        want = "cpu" if self.emulate else "cuda"
        if t.device.type != want:
            raise ValueError(f"{what}: expected a {want.upper()} tensor, got one on {t.device}")
        return t.device

    def call(self, name: str, dev: torch.device, *args) -> None:
        if self.emulate:
            getattr(_cuda, "emulate_" + name)(*args, self.path, self.reverse)
        else:
            with torch.cuda.device(dev):
                getattr(_cuda, name)(*args, self.path, dev.index, stream(dev))


def _aligned(t: torch.Tensor | None, dtype: torch.dtype, dev: torch.device):
    """``t`` as a contiguous ``dtype`` tensor on ``dev`` at a 16-byte aligned address (the
    kernels read it with 16-byte vector loads)."""
    t = as_device(t, dtype, dev)
    if t is not None and t.numel() and t.data_ptr() % 16:
        t = t.clone()
    return t


def _gemm_w4(run: _Runner, x, packed, scales, zeros, bias, N, K, group_size, mode):
    what = "gemm_w4"
    dev = run.main(x, what)
    checks.gemm_w4(x, packed, scales, zeros, bias, N, K, group_size, mode)
    if zeros is not None and zeros.is_floating_point():
        raise ValueError(f"{what}: float zero points (HQQ) run on the CPU kernels only; the CUDA "
                         "kernel takes int32 zero points")
    nb = K // 32
    x32 = _aligned(x, torch.float32, dev)
    m = x32.numel() // K
    packed = _aligned(packed, torch.uint8, dev)
    scales = _aligned(scales, torch.float32, dev)
    zeros = as_device(zeros, torch.int32, dev)
    bias = as_device(bias, torch.float32, dev)
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32, device=dev)
    if m == 0 or N == 0:
        return y
    xq = dx = xs = bad = None
    if mode == 1:  # workspaces of the activation quantization
        checks.int8_act_bound_x(what, x32, group_size, "group_size")
        xq = torch.empty(m * K, dtype=torch.int8, device=dev)
        dx = torch.empty(m * nb, dtype=torch.float32, device=dev)
        xs = torch.empty(m * nb, dtype=torch.float32, device=dev)
        bad = torch.empty(1, dtype=torch.int32, device=dev)
    run.call(what, dev, x32.data_ptr(), m, packed.data_ptr(), scales.data_ptr(), addr(zeros),
             addr(bias), N, K, group_size, mode, addr(xq), addr(dx), addr(xs), addr(bad),
             y.data_ptr())
    if bad is not None and int(bad.item()):  # synchronizes with the stream
        raise NonFiniteError(f"{what}: x contains NaN or Inf (the fast mode quantizes x to "
                             "int8; use mode=0 (exact) to propagate them)")
    return y


def _gemm_lut4(run: _Runner, x, packed, scales, table, bias, N, K, group_size):
    what = "gemm_lut4"
    dev = run.main(x, what)
    checks.gemm_lut4(what, x, packed, scales, table, bias, N, K, group_size, cuda_group_error)
    x32 = _aligned(x, torch.float32, dev)
    packed = _aligned(packed, torch.uint8, dev)
    scales = as_device(scales, torch.float32, dev)
    table = as_device(table.reshape(-1)[:16], torch.float32, dev)
    bias = as_device(bias, torch.float32, dev)
    m = x32.shape[0]
    y = torch.empty((m, N), dtype=torch.float32, device=dev)
    if m == 0 or N == 0:
        return y
    run.call(what, dev, x32.data_ptr(), m, packed.data_ptr(), scales.data_ptr(),
             table.data_ptr(), addr(bias), N, K, group_size, y.data_ptr())
    return y


def _gemm_w8(run: _Runner, a8: bool, x, packed_w, w_scale, bias, N, K):
    what = "gemm_w8a8" if a8 else "gemm_w8a16"
    dev = run.main(x, what)
    checks.gemm_w8(what, x, packed_w, w_scale, bias, N, K)
    if a8 and K > _W8A8_MAX_K:
        raise ValueError(f"{what}: K = {K} exceeds {_W8A8_MAX_K}, the largest K whose int32 "
                         "accumulation cannot overflow")
    m = math.prod(x.shape[:-1])
    x32 = _aligned(x, torch.float32, dev)
    packed_w = _aligned(packed_w, torch.int8, dev)
    w_scale = as_device(w_scale.reshape(-1), torch.float32, dev)
    bias = as_device(None if bias is None else bias.reshape(-1), torch.float32, dev)
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32, device=dev)
    if m == 0 or N == 0:
        return y.to(x.dtype)
    if a8:
        checks.int8_act_bound_x(what, x32, K, "K")
        kp = (K + 3) // 4 * 4
        xq = torch.empty(m * kp, dtype=torch.int8, device=dev)
        sx = torch.empty(m, dtype=torch.float32, device=dev)
        bad = torch.empty(1, dtype=torch.int32, device=dev)
        run.call(what, dev, x32.data_ptr(), m, packed_w.data_ptr(), w_scale.data_ptr(),
                 addr(bias), N, K, addr(xq), sx.data_ptr(), bad.data_ptr(), y.data_ptr())
        if int(bad.item()):  # synchronizes with the stream, as the quantize ops do
            raise NonFiniteError(f"{what}: x contains NaN or Inf")
    else:
        run.call(what, dev, x32.data_ptr(), m, packed_w.data_ptr(), w_scale.data_ptr(),
                 addr(bias), N, K, y.data_ptr())
    return y.to(x.dtype)


def _gemm_w8a8(run: _Runner, *args):
    return _gemm_w8(run, True, *args)


def _gemm_w8a16(run: _Runner, *args):
    return _gemm_w8(run, False, *args)


_MATMULS = {
    "gemm_w4": _gemm_w4,
    "gemm_lut4": _gemm_lut4,
    "gemm_w8a8": _gemm_w8a8,
    "gemm_w8a16": _gemm_w8a16,
}


def _path_id(path: int | str) -> int:
    return _PATHS[path] if isinstance(path, str) else path


def run_matmul(op: str, *args, path: int | str = "auto"):
    """The CUDA kernel of ``torch.ops.qkern.<op>`` with the kernel family forced: ``path``
    "gemv" (rows of x in chunks of 8), "gemm" or "auto" (what the op itself runs)."""
    if _cuda is None:
        raise RuntimeError("qkern._cuda is not built: no CUDA kernels")
    return _MATMULS[op](_Runner(False, _path_id(path)), *args)


def emulate(op: str, *args, path: int | str = "auto", reverse: bool = False):
    """``torch.ops.qkern.<op>`` (a matmul) as its CUDA implementation computes it, run on the
    host over CPU tensors: the same argument handling, workspaces and launch sequence, every
    kernel step executed thread by thread (``reverse``: threads in reverse order), every
    memory access bounds-checked. Needs ``qkern._cuda``, not a GPU."""
    if _cuda is None:
        raise RuntimeError("qkern._cuda is not built: no CUDA kernels to emulate")
    return _MATMULS[op](_Runner(True, _path_id(path), reverse), *args)


def _device_matmul(op: str):
    def impl(*args):
        return _MATMULS[op](_Runner(), *args)

    impl.__name__ = op
    return impl


_IMPLS = {**ELEMENTWISE, **{op: _device_matmul(op) for op in _MATMULS}}

_MISSING = ("a CUDA tensor, but qkern was built without its CUDA kernels (qkern._cuda is "
            "missing): rebuild with nvcc available (QKERN_CUDA=ON) or move the tensors to the CPU")


def _missing(op: str):
    def impl(*args, **kwargs):
        raise RuntimeError(f"qkern::{op}: {_MISSING}")

    impl.__name__ = op
    return impl


for _name, _fn in _IMPLS.items():
    LIB.impl(_name, _fn if _cuda is not None else _missing(_name), "CUDA")
