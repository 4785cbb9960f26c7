"""Every qkern:: op schema and its fake (meta) kernel, in one place.

Device kernels register separately (``cpu.py`` and the matmul modules ``w4.py``, ``w23.py``,
``w8.py``, ``lut4.py``, ``fp8.py``, ``bits.py`` -> ``qkern._C``; ``cuda*.py`` ->
``qkern._cuda``); their argument checks live in ``checks.py``.
All ops see flat contiguous data: ``n`` elements in ``n // group_size`` consecutive groups,
group ``g`` using ``scale.view(-1)[g]``. Codes are uint8 (two's complement bytes for signed
formats); the Python layer reinterprets them. ``seed`` is a uint64 passed as int64 bits.
``quantize_affine_dynamic`` returns one zero point per group for the min/max rule and an empty
zero-point tensor for the symmetric rules (their zero point is 0; nothing is allocated).

The ``*_out`` ops write into preallocated outputs (``Tensor(a!)``: contiguous, on x's device,
of the functional op's length; codes may be uint8 or int8) and return nothing: the functional
ops are these plus the allocation. For a symmetric rule ``quantize_affine_dynamic_out`` takes an
empty ``zero_point``.
"""

from __future__ import annotations

import torch

from . import checks, fp_checks, fq_checks

LIB = torch.library.Library("qkern", "DEF")

SCHEMAS = {
    "quantize_affine": (
        "quantize_affine(Tensor x, Tensor scale, Tensor? zero_point, int group_size, int qmin, "
        "int qmax, int rounding, int shape, float deadzone_half, int seed) -> Tensor"
    ),
    "quantize_affine_dynamic": (
        "quantize_affine_dynamic(Tensor x, int group_size, int qmin, int qmax, int rule, "
        "float qpos, int emax, int rounding, int shape, float deadzone_half, int seed) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "dequantize_affine": (
        "dequantize_affine(Tensor codes, Tensor scale, Tensor? zero_point, int group_size, "
        "bool is_signed, float offset) -> Tensor"
    ),
    "quantize_codebook": (
        "quantize_codebook(Tensor x, Tensor scale, Tensor values, Tensor value_codes, "
        "int sign_bit, int group_size, int rounding, int seed) -> Tensor"
    ),
    "quantize_codebook_dynamic": (
        "quantize_codebook_dynamic(Tensor x, Tensor values, Tensor value_codes, int sign_bit, "
        "int group_size, int rule, float max_value, int emax, int rounding, int seed) "
        "-> (Tensor, Tensor)"
    ),
    "dequantize_lut": (
        "dequantize_lut(Tensor codes, Tensor scale, Tensor lut, int group_size) -> Tensor"
    ),
    # the decoded weight of gemm_vq's operands (for many rows of x: a GEMM over it)
    "dequantize_vq": (
        "dequantize_vq(Tensor packed, Tensor codebooks, Tensor? scales, int N, int K, "
        "int group_rows) -> Tensor"
    ),
    # preallocated outputs (qkern.quantize(..., out=) and QTensor.dequantize(out=))
    "quantize_affine_out": (
        "quantize_affine_out(Tensor x, Tensor scale, Tensor? zero_point, int group_size, "
        "int qmin, int qmax, int rounding, int shape, float deadzone_half, int seed, "
        "Tensor(a!) out) -> ()"
    ),
    "quantize_affine_dynamic_out": (
        "quantize_affine_dynamic_out(Tensor x, int group_size, int qmin, int qmax, int rule, "
        "float qpos, int emax, int rounding, int shape, float deadzone_half, int seed, "
        "Tensor(a!) codes, Tensor(b!) scale, Tensor(c!) zero_point) -> ()"
    ),
    "dequantize_affine_out": (
        "dequantize_affine_out(Tensor codes, Tensor scale, Tensor? zero_point, int group_size, "
        "bool is_signed, float offset, Tensor(a!) out) -> ()"
    ),
    "quantize_codebook_out": (
        "quantize_codebook_out(Tensor x, Tensor scale, Tensor values, Tensor value_codes, "
        "int sign_bit, int group_size, int rounding, int seed, Tensor(a!) out) -> ()"
    ),
    "quantize_codebook_dynamic_out": (
        "quantize_codebook_dynamic_out(Tensor x, Tensor values, Tensor value_codes, "
        "int sign_bit, int group_size, int rule, float max_value, int emax, int rounding, "
        "int seed, Tensor(a!) codes, Tensor(b!) scale) -> ()"
    ),
    "dequantize_lut_out": (
        "dequantize_lut_out(Tensor codes, Tensor scale, Tensor lut, int group_size, "
        "Tensor(a!) out) -> ()"
    ),
    "pack_bits": "pack_bits(Tensor codes, int bits, bool msb) -> Tensor",
    "unpack_bits": "unpack_bits(Tensor packed, int bits, int n, bool msb) -> Tensor",
    "mulaw_encode": "mulaw_encode(Tensor pcm) -> Tensor",
    "mulaw_decode": "mulaw_decode(Tensor codes) -> Tensor",
    "alaw_encode": "alaw_encode(Tensor pcm) -> Tensor",
    "alaw_decode": "alaw_decode(Tensor codes) -> Tensor",
    # x H_n / sqrt(n) over the last dimension (ops/hadamard.py)
    "fwht": "fwht(Tensor x) -> Tensor",
    # LSQ / LSQ+ fake quantization and its fused backward (ops/fake_quant.py)
    "lsq_fake_quantize": (
        "lsq_fake_quantize(Tensor x, Tensor scale, Tensor? offset, int? axis, int q_n, "
        "int q_p, float grad_factor) -> Tensor"
    ),
    "lsq_fake_quantize_backward": (
        "lsq_fake_quantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor? offset, "
        "int? axis, int q_n, int q_p, float grad_factor) -> (Tensor, Tensor, Tensor)"
    ),
    # int32 accumulator -> int8 / int32 with a fixed-point multiplier (ops/fixedpoint.py)
    "requantize": (
        "requantize(Tensor acc, Tensor multiplier, Tensor shift, int zero_point, int qmin, "
        "int qmax, int out_bits) -> Tensor"
    ),
}

# The quantized matmuls and their packing (docs/numerics.md; layouts in the op modules).
MATMUL_SCHEMAS = {
    "gemm_w4": (
        "gemm_w4(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, int N, "
        "int K, int group_size, int mode) -> Tensor"
    ),
    "gemm_w23": (
        "gemm_w23(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, int N, "
        "int K, int group_size, int bits, int qmin, int mode) -> Tensor"
    ),
    "gemm_lut4": (
        "gemm_lut4(Tensor x, Tensor packed, Tensor scales, Tensor table, Tensor? bias, int N, "
        "int K, int group_size) -> Tensor"
    ),
    "gemm_lut4_fast": (
        "gemm_lut4_fast(Tensor x, Tensor packed, Tensor scales, Tensor table8, Tensor? bias, "
        "int N, int K, int group_size) -> Tensor"
    ),
    "gemm_lut4_dq": (
        "gemm_lut4_dq(Tensor x, Tensor packed, Tensor qscales, Tensor scale2, Tensor mean, "
        "Tensor table, Tensor? bias, int N, int K, int group_size, int dq_group) -> Tensor"
    ),
    "gemm_fp8": (
        "gemm_fp8(Tensor x, Tensor w, Tensor scales, Tensor? bias, int N, int K, "
        "int group_size, int fmt) -> Tensor"
    ),
    "gemm_binary": (
        "gemm_binary(Tensor x, Tensor wbits, Tensor alpha, Tensor? bias, int N, int K, "
        "bool xnor) -> Tensor"
    ),
    "gemm_ternary": (
        "gemm_ternary(Tensor x, Tensor wpacked, Tensor alpha, Tensor? bias, int N, int K) "
        "-> Tensor"
    ),
    "pack_w8": "pack_w8(Tensor codes) -> Tensor",
    "gemm_w8a8": (
        "gemm_w8a8(Tensor x, Tensor packed_w, Tensor w_scale, Tensor? bias, int N, int K) "
        "-> Tensor"
    ),
    "gemm_w8a16": (
        "gemm_w8a16(Tensor x, Tensor packed_w, Tensor w_scale, Tensor? bias, int N, int K) "
        "-> Tensor"
    ),
    # the exact integer core, for activations quantized by the caller (static or per-tensor)
    "gemm_s8s8_s32": "gemm_s8s8_s32(Tensor xq, Tensor packed_w, int N, int K) -> Tensor",
    # y (computed from int8-quantized x by the caller) with the straight-through gradient of
    # x @ W^T for x: the autograd of the int8-activation paths (ops/autograd.py)
    "ste_w8": "ste_w8(Tensor y, Tensor x, Tensor packed_w, Tensor w_scale, int N, int K) -> Tensor",
    # LLM.int8: int8 x int8 over the columns of x below the threshold, float over the outlier
    # columns (ops/w8mixed.py); threshold is a 1-element float tensor (a layer buffer)
    "gemm_w8a8_mixed": (
        "gemm_w8a8_mixed(Tensor x, Tensor packed_w, Tensor w_scale, Tensor? bias, int N, int K, "
        "Tensor threshold) -> Tensor"
    ),
    # vector-quantized weights (ops/vq.py; qkern.vq.VQLinear)
    "gemm_vq": (
        "gemm_vq(Tensor x, Tensor packed, Tensor codebooks, Tensor? scales, Tensor? bias, int N, "
        "int K, int group_rows) -> Tensor"
    ),
    # its int8 fast mode: int8 codebooks and activations (ops/vq8.py)
    "gemm_vq8": (
        "gemm_vq8(Tensor x, Tensor packed4, Tensor codebooks8, Tensor book_scales, Tensor? "
        "scales, Tensor? bias, int N, int K, int group_rows) -> Tensor"
    ),
}

for _schema in (*SCHEMAS.values(), *MATMUL_SCHEMAS.values()):
    LIB.define(_schema)


def _groups(x: torch.Tensor, group_size: int) -> int:
    return x.numel() // group_size if group_size > 0 else 0


@torch.library.register_fake("qkern::quantize_affine")
def _(x, scale, zero_point, group_size, qmin, qmax, rounding, shape, deadzone_half, seed):
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device)


@torch.library.register_fake("qkern::quantize_affine_dynamic")
def _(x, group_size, qmin, qmax, rule, qpos, emax, rounding, shape, deadzone_half, seed):
    g = _groups(x, group_size)
    return (
        torch.empty(x.shape, dtype=torch.uint8, device=x.device),
        torch.empty(g, dtype=torch.float32, device=x.device),
        torch.empty(checks.dynamic_zero_points(x.numel(), group_size, rule), dtype=torch.int32,
                    device=x.device),
    )


@torch.library.register_fake("qkern::dequantize_affine")
def _(codes, scale, zero_point, group_size, is_signed, offset):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.register_fake("qkern::quantize_codebook")
def _(x, scale, values, value_codes, sign_bit, group_size, rounding, seed):
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device)


@torch.library.register_fake("qkern::quantize_codebook_dynamic")
def _(x, values, value_codes, sign_bit, group_size, rule, max_value, emax, rounding, seed):
    g = _groups(x, group_size)
    return (
        torch.empty(x.shape, dtype=torch.uint8, device=x.device),
        torch.empty(g, dtype=torch.float32, device=x.device),
    )


@torch.library.register_fake("qkern::dequantize_lut")
def _(codes, scale, lut, group_size):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _no_output(*args):
    return None


for _name in [k for k in SCHEMAS if k.endswith("_out")]:
    torch.library.register_fake(f"qkern::{_name}", _no_output)


@torch.library.register_fake("qkern::pack_bits")
def _(codes, bits, msb):
    return torch.empty((codes.numel() * bits + 7) // 8, dtype=torch.uint8, device=codes.device)


@torch.library.register_fake("qkern::unpack_bits")
def _(packed, bits, n, msb):
    return torch.empty(n, dtype=torch.uint8, device=packed.device)


@torch.library.register_fake("qkern::mulaw_encode")
def _(pcm):
    return torch.empty(pcm.shape, dtype=torch.uint8, device=pcm.device)


@torch.library.register_fake("qkern::alaw_encode")
def _(pcm):
    return torch.empty(pcm.shape, dtype=torch.uint8, device=pcm.device)


@torch.library.register_fake("qkern::mulaw_decode")
def _(codes):
    return torch.empty(codes.shape, dtype=torch.int16, device=codes.device)


@torch.library.register_fake("qkern::alaw_decode")
def _(codes):
    return torch.empty(codes.shape, dtype=torch.int16, device=codes.device)


@torch.library.register_fake("qkern::fwht")
def _(x):
    checks.fwht(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("qkern::requantize")
def _(acc, multiplier, shift, zero_point, qmin, qmax, out_bits):
    fp_checks.requantize(acc, multiplier, shift, zero_point, qmin, qmax, out_bits)
    return torch.empty(acc.shape, dtype=fp_checks.OUT_DTYPES[out_bits], device=acc.device)


@torch.library.register_fake("qkern::lsq_fake_quantize")
def _(x, scale, offset, axis, q_n, q_p, grad_factor):
    fq_checks.fake_quantize(x, scale, offset, axis, q_n, q_p, grad_factor)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("qkern::lsq_fake_quantize_backward")
def _(grad, x, scale, offset, axis, q_n, q_p, grad_factor):
    fq_checks.fake_quantize(x, scale, offset, axis, q_n, q_p, grad_factor)
    fq_checks.backward(grad, x)
    gb = torch.empty_like(offset) if offset is not None else scale.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(scale), gb


# ---- quantized matmuls ------------------------------------------------------------------------

def _out(x: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n), dtype=dtype)


@torch.library.register_fake("qkern::gemm_w4")
def _(x, packed, scales, zeros, bias, N, K, group_size, mode):
    torch._check(x.dim() >= 1 and x.shape[-1] == K, lambda: "gemm_w4: x must be (..., K)")
    return _out(x, N)


@torch.library.register_fake("qkern::gemm_w23")
def _(x, packed, scales, zeros, bias, N, K, group_size, bits, qmin, mode):
    torch._check(x.dim() >= 1 and x.shape[-1] == K, lambda: "gemm_w23: x must be (..., K)")
    return _out(x, N)


@torch.library.register_fake("qkern::gemm_lut4")
def _(x, packed, scales, table, bias, N, K, group_size):
    torch._check(x.dim() == 2 and x.shape[1] == K, lambda: "gemm_lut4: x must be (M, K)")
    return _out(x, N)


@torch.library.register_fake("qkern::gemm_lut4_fast")
def _(x, packed, scales, table8, bias, N, K, group_size):
    torch._check(x.dim() >= 1 and x.shape[-1] == K, lambda: "gemm_lut4_fast: x must be (..., K)")
    return _out(x, N)


@torch.library.register_fake("qkern::gemm_lut4_dq")
def _(x, packed, qscales, scale2, mean, table, bias, N, K, group_size, dq_group):
    torch._check(x.dim() == 2 and x.shape[1] == K, lambda: "gemm_lut4_dq: x must be (M, K)")
    return _out(x, N)


@torch.library.register_fake("qkern::gemm_vq")
def _(x, packed, codebooks, scales, bias, N, K, group_rows):
    torch._check(x.dim() == 2 and x.shape[1] == K, lambda: "gemm_vq: x must be (M, K)")
    return _out(x, N)


@torch.library.register_fake("qkern::gemm_vq8")
def _(x, packed4, codebooks8, book_scales, scales, bias, N, K, group_rows):
    torch._check(x.dim() == 2 and x.shape[1] == K, lambda: "gemm_vq8: x must be (M, K)")
    return _out(x, N)


@torch.library.register_fake("qkern::dequantize_vq")
def _(packed, codebooks, scales, N, K, group_rows):
    return packed.new_empty((N, K), dtype=torch.float32)


@torch.library.register_fake("qkern::gemm_fp8")
def _(x, w, scales, bias, N, K, group_size, fmt):
    torch._check(x.dim() == 2 and x.shape[1] == K, lambda: "gemm_fp8: x must be (M, K)")
    return _out(x, N)


@torch.library.register_fake("qkern::gemm_binary")
def _(x, wbits, alpha, bias, N, K, xnor):
    checks.gemm_bits("gemm_binary", x, wbits, alpha, bias, N, K)
    return _out(x, N)


@torch.library.register_fake("qkern::gemm_ternary")
def _(x, wpacked, alpha, bias, N, K):
    checks.gemm_bits("gemm_ternary", x, wpacked, alpha, bias, N, K)
    return _out(x, N)


@torch.library.register_fake("qkern::pack_w8")
def _(codes):
    checks.w8_codes(codes)
    n, k = codes.shape
    return codes.new_empty(checks.w8_packed_nbytes(n, k))


@torch.library.register_fake("qkern::gemm_w8a8")
def _(x, packed_w, w_scale, bias, N, K):
    checks.gemm_w8("gemm_w8a8", x, packed_w, w_scale, bias, N, K)
    return _out(x, N, x.dtype)


@torch.library.register_fake("qkern::gemm_w8a16")
def _(x, packed_w, w_scale, bias, N, K):
    checks.gemm_w8("gemm_w8a16", x, packed_w, w_scale, bias, N, K)
    return _out(x, N, x.dtype)


@torch.library.register_fake("qkern::gemm_w8a8_mixed")
def _(x, packed_w, w_scale, bias, N, K, threshold):
    checks.gemm_w8("gemm_w8a8_mixed", x, packed_w, w_scale, bias, N, K)
    checks.threshold_tensor("gemm_w8a8_mixed", threshold)
    return _out(x, N, x.dtype)


@torch.library.register_fake("qkern::gemm_s8s8_s32")
def _(xq, packed_w, N, K):
    checks.gemm_s8s8(xq, packed_w, N, K)
    return _out(xq, N, torch.int32)


@torch.library.register_fake("qkern::ste_w8")
def _(y, x, packed_w, w_scale, N, K):
    checks.gemm_w8("ste_w8", x, packed_w, w_scale, None, N, K)
    torch._check(tuple(y.shape) == (*x.shape[:-1], N), lambda: "ste_w8: y must be (..., N)")
    return torch.empty_like(y)
