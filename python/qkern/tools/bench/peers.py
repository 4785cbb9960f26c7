"""The peers ``qkern bench matmul`` times qkern against, each built from one ``nn.Linear``.

Every maker returns a :class:`Peer`: the call on an activation ``x`` (M, K), the weight bytes it
reads per call, and its own dequantized weight (N, K) as float32, so a test can check that the
call computes ``x @ W^T`` of the weights it was given (tests/test_bench_peers.py). A maker raises
ImportError when its package is missing and RuntimeError when its op cannot run here.

- torch's dynamic int8 Linear (fbgemm), ``aten._weight_int4pack_mm_for_cpu`` (torchao's int4
  CPU path), ``aten._weight_int8pack_mm``: in every torch build qkern supports;
- bitsandbytes' NF4 ``matmul_4bit``, where bitsandbytes is installed;
- GPTQModel's AVX512-BF16 W4A16 GPTQ kernel (``TorchCpuAvx512Linear``'s op), where the
  ``gptqmodel`` package imports and its torch.ops extension builds (a JIT build on first use,
  minutes; cached under ``~/.cache/gptqmodel/torch_extensions``, or
  ``$GPTQMODEL_TORCH_EXTENSIONS_DIR``). GPTQModel 7.7's dependencies need not all be installed:
  importing ``gptqmodel`` needs transformers, accelerate, pypcre, logbar, device-smi, tokenicer
  and defuser (``pip install --no-deps --target DIR ...`` and DIR on PYTHONPATH is enough).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class Peer(NamedTuple):
    fn: Callable[[torch.Tensor], torch.Tensor]  # x (M, K) float32 -> (M, N)
    nbytes: int  # stored weight bytes read per call (codes + scales/zeros)
    weight: Callable[[], torch.Tensor]  # its dequantized weight (N, K), float32
    bias: torch.Tensor | None = None  # the bias the call adds, if it adds one


def _minmax_uint4(w: torch.Tensor, group: int):
    """Asymmetric uint4 per group of ``group`` inputs: (q, lo, scale), q (N, K) int32, lo and
    scale (N, K/group)."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.view(n, k), lo, scale


def _per_group(t: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K/group) -> (N, K), each value repeated over its group."""
    return t.repeat_interleave(group, dim=1)


def aten_int4(lin: nn.Linear, group: int = 128) -> Peer:
    """torch's int4 CPU weight path: asymmetric uint4 per group, scales and zeros (K/g, N, 2)."""
    w = lin.weight.detach()
    n, k = w.shape
    q, lo, scale = _minmax_uint4(w, group)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    zeros = lo + 8 * scale  # aten dequantizes (q - 8) * scale + zero
    sz = torch.stack([scale, zeros], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    s16, z16 = sz[..., 0].t().float(), sz[..., 1].t().float()
    # bfloat16 activations: the path torchao uses (its float32 path is far slower)
    return Peer(lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16),
                                                                     packed, group, sz),
                n * k // 2,
                lambda: (q - 8).float() * _per_group(s16, group) + _per_group(z16, group))


def aten_int8(lin: nn.Linear) -> Peer:
    w = lin.weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-8)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    scale = scale.to(torch.bfloat16)
    return Peer(lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale),
                q.numel(), lambda: q.float() * scale.float()[:, None])


def bnb_nf4(lin: nn.Linear) -> Peer:
    """bitsandbytes' NF4 (blocks of 64) through ``matmul_4bit``, where bitsandbytes is
    installed (not a qkern dependency). Its ``gemv_4bit`` is not used: on a CPU install without
    the optional ``kernels`` package it returned wrong results (checked against
    ``dequantize_4bit``)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    w = lin.weight.detach().float()
    q, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    return Peer(lambda x: bnb.matmul_4bit(x, q.t(), quant_state=state),
                q.numel() + w.numel() // 16, lambda: bf.dequantize_4bit(q, state).float())


def torch_dynamic_int8(lin: nn.Linear) -> Peer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear},
                                                   dtype=torch.qint8)
    return Peer(m, lin.weight.numel(), lambda: m[0].weight().dequantize().float(),
                None if lin.bias is None else lin.bias.detach())


_GPTQM_OPS: dict[str, object] = {}


def _gptqmodel_ops() -> tuple[Callable, Callable]:
    """GPTQModel's (gemm, pack) torch.ops of its ``int4_qzero_group_scaled_cpu`` extension,
    loaded once per process (a failure is remembered too: the build is not retried)."""
    if "error" in _GPTQM_OPS:
        raise _GPTQM_OPS["error"]  # type: ignore[misc]
    if "ops" not in _GPTQM_OPS:
        print("  GPTQModel: importing gptqmodel, loading its int4_qzero_group_scaled_cpu "
              "extension (a first run JIT-builds it: minutes)", flush=True)
        threads = torch.get_num_threads()
        sink = io.StringIO()  # its banner, logs and build progress bar
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                from gptqmodel import extension
                from gptqmodel.utils.cpu_features import avx512_bf16_error, has_avx512_bf16

                if not has_avx512_bf16():
                    raise RuntimeError(avx512_bf16_error())
                name = "int4_qzero_group_scaled_cpu"
                _GPTQM_OPS["ops"] = (
                    extension.op(name, "gemm_int4_qzero_group_scaled_cpu_forward"),
                    extension.op(name, "pack_gptq_int4"))
        except ImportError as e:
            _GPTQM_OPS["error"] = e
            raise
        except Exception as e:  # a failed JIT build, a CPU without AVX512-BF16
            _GPTQM_OPS["error"] = RuntimeError(str(e).strip().splitlines()[-1] if str(e)
                                               else type(e).__name__)
            raise _GPTQM_OPS["error"] from e  # type: ignore[misc]
        finally:
            torch.set_num_threads(threads)
    return _GPTQM_OPS["ops"]  # type: ignore[return-value]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(R, C) codes 0..15 -> (R, C/8) int32, code j of each 8 in bits 4j..4j+3 (GPTQ order)."""
    r, c = codes.shape
    shifts = 4 * torch.arange(8, dtype=torch.int64)
    words = (codes.to(torch.int64).view(r, c // 8, 8) << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def gptqmodel_int4(lin: nn.Linear, group: int = 128) -> Peer:
    """GPTQModel 7.7's CPU W4A16 kernel (``TorchCpuAvx512Linear``): GPTQ int4 weights (qweight
    (K/8, N), qzeros (K/g, N/8) int32, zero codes stored as is: format v2), here rounded to
    nearest per group (the kernel's speed does not depend on how the codes were chosen),
    repacked by its ``pack_gptq_int4`` op as the layer's ``transform_cpu`` does, run by its
    ``gemm_int4_qzero_group_scaled_cpu_forward`` op: bfloat16 activations and output, float32
    scales and bias, (q - zero) * scale."""
    gemm, pack = _gptqmodel_ops()
    w = lin.weight.detach()
    n, k = w.shape
    q, lo, scale = _minmax_uint4(w, group)
    zero = (-lo / scale).round().clamp(0, 15)
    q = (w.float() / _per_group(scale, group) + _per_group(zero, group)).round().clamp(0, 15)
    qweight = _pack_nibbles(q).t().contiguous()  # (K/8, N)
    qzeros = _pack_nibbles(zero.to(torch.int32).t().contiguous())  # (K/g, N/8)
    packed, zero_codes = pack(qweight, qzeros, torch.empty(0, dtype=torch.int32), n, k)
    scales = scale.t().contiguous()  # (K/g, N) float32
    bias = None if lin.bias is None else lin.bias.detach().float().contiguous()
    return Peer(lambda x: gemm(x.to(torch.bfloat16).contiguous(), packed, zero_codes, scales,
                               group, bias),
                packed.numel() + zero_codes.numel() + scales.numel() * 4,
                lambda: (q - _per_group(zero, group)) * _per_group(scale, group), bias)
