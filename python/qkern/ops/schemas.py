"""Every qkern:: op schema and its fake (meta) kernel, in one place.

Device kernels register separately (``cpu.py`` -> ``qkern._C``, ``cuda.py`` -> ``qkern._cuda``).
All ops see flat contiguous data: ``n`` elements in ``n // group_size`` consecutive groups,
group ``g`` using ``scale.view(-1)[g]``. Codes are uint8 (two's complement bytes for signed
formats); the Python layer reinterprets them. ``seed`` is a uint64 passed as int64 bits.
"""

from __future__ import annotations

import torch

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
    "pack_bits": "pack_bits(Tensor codes, int bits, bool msb) -> Tensor",
    "unpack_bits": "unpack_bits(Tensor packed, int bits, int n, bool msb) -> Tensor",
    "mulaw_encode": "mulaw_encode(Tensor pcm) -> Tensor",
    "mulaw_decode": "mulaw_decode(Tensor codes) -> Tensor",
    "alaw_encode": "alaw_encode(Tensor pcm) -> Tensor",
    "alaw_decode": "alaw_decode(Tensor codes) -> Tensor",
}

for _schema in SCHEMAS.values():
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
        torch.empty(g, dtype=torch.int32, device=x.device),
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
