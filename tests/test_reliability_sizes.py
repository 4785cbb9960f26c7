"""Huge sizes and exponents are a ValueError, never an int64 wrap-around (issue 9, "Crashes and
memory safety" and the UBSan findings): every product of sizes in the bindings goes through
csrc/bindings/checked.h (checked_mul, cap 2^56) and in ops/checks.py through size_product.

Before the fix several of these cases segfaulted (n * k wrapped, so a size check passed and a
kernel ran over 2^62 rows) or were signed-overflow UB, so they run in a subprocess: a crash
fails the test with the name of the case that crashed."""

import subprocess
import sys
import textwrap

import pytest
import torch

import qkern  # noqa: F401  (registers torch.ops.qkern)
from qkern import _C
from qkern.ops import checks

CASES = textwrap.dedent("""
    import numpy as np, torch, qkern
    from qkern import _C
    ops = torch.ops.qkern
    f32 = torch.zeros(64)
    u8 = torch.zeros(64, dtype=torch.uint8)
    p = f32.data_ptr()
    q = u8.data_ptr()
    empty8 = np.zeros(0, np.int8)
    BIG = 2**62
    cases = {
        # the issue's cases: n * k wrapped in int64
        "pack_w8 2^62": lambda: _C.pack_w8(empty8, BIG, 4),
        "pack_w8 2^32 x 2^32": lambda: _C.pack_w8(empty8, 2**32, 2**32),
        "unpack_w8 2^62": lambda: _C.unpack_w8(empty8, BIG, 4),
        "unpack_w8 2^32 x 2^32": lambda: _C.unpack_w8(empty8, 2**32, 2**32),
        "w8_packed_nbytes": lambda: _C.w8_packed_nbytes(2**32, 2**32),
        "gemm_s8s8_s32": lambda: _C.gemm_s8s8_s32(empty8, empty8, 2**32, 0, 2**32),
        "bits_packed_nbytes": lambda: _C.bits_packed_nbytes(BIG, 30, False),
        "gemm_lut4_dq dq_group 2^63-1 (raw)": lambda: _C.gemm_lut4_dq_raw(
            p, 1, q, q, p, 0.0, p, 0, 16, 32, 32, 2**63 - 1, p),
        "unpack_bits n 2^61 (raw)": lambda: _C.unpack_bits_raw(q, 2**61, 8, False, q),
        "pack_bits n 2^61 (raw)": lambda: _C.pack_bits_raw(q, 2**61, 8, False, q),
        "affine emax -2^31 (raw)": lambda: _C.quantize_affine_dynamic_raw(
            p, 64, 32, -127, 127, _C.SCALE_RULES["pow2_mx"], 1.0, -2**31, 0, 0, 0.0, 0, p, p, q),
        "affine emax 2^31 - 1 (raw)": lambda: _C.quantize_affine_dynamic_raw(
            p, 64, 32, -127, 127, _C.SCALE_RULES["pow2_mx"], 1.0, 2**31 - 1, 0, 0, 0.0, 0, p,
            p, q),
        "codebook emax -2^31 (raw)": lambda: _C.quantize_codebook_dynamic_raw(
            p, 64, p, q, 1, 0, 32, _C.SCALE_RULES["pow2_mx"], 1.0, -2**31, 0, 0, p, q),
        # M x K wrapping in the matmuls' raw bindings
        "gemm_w8_raw": lambda: _C.gemm_w8_raw(True, p, 2**60, q, p, 0, 16, 64, p),
        "gemm_bits_raw": lambda: _C.gemm_bits_raw(False, p, 2**60, q, p, 0, 8, 64, False, p),
        "gemm_fp8_raw": lambda: _C.gemm_fp8_raw(p, 2**60, q, p, 0, 1, 64, 0, 0, p),
        "gemm_lut4_raw": lambda: _C.gemm_lut4_raw(p, 2**60, q, p, p, 0, 1, 64, 32, p),
        "gemm_w4_raw": lambda: _C.gemm_w4_raw(p, 2**60, q, p, 0, 0, 8, 64, 32, 0, p),
        "gemm_w23_raw": lambda: _C.gemm_w23_raw(p, 2**60, q, p, 0, 0, 8, 64, 32, 2, 0, 0, p),
        "unpack_w4 N x K": lambda: _C.unpack_w4(np.zeros(0, np.uint8), 2**40, 2**40),
        "unpack_w23 N x K": lambda: _C.unpack_w23(np.zeros(0, np.uint8), 2**40, 2**40, 2),
        # the torch ops
        "op gemm_lut4_dq dq_group 2^63-1": lambda: ops.gemm_lut4_dq(
            torch.zeros(1, 32), torch.zeros(16, dtype=torch.uint8),
            torch.zeros(1, dtype=torch.int8), torch.zeros(0), torch.zeros(1), torch.zeros(16),
            None, 1, 32, 32, 2**63 - 1),
        "op unpack_bits n 2^61": lambda: ops.unpack_bits(u8, 8, 2**61, False),
        "op affine emax -2^31": lambda: ops.quantize_affine_dynamic(
            f32, 32, -127, 127, _C.SCALE_RULES["pow2_mx"], 1.0, -2**31, 0, 0, 0.0, 0),
        "op affine emax 2^40": lambda: ops.quantize_affine_dynamic(
            f32, 32, -127, 127, _C.SCALE_RULES["pow2_mx"], 1.0, 2**40, 0, 0, 0.0, 0),
        "op codebook emax 2^31": lambda: ops.quantize_codebook_dynamic(
            f32, torch.tensor([0.0, 1.0]), torch.tensor([0, 1], dtype=torch.uint8), 0, 32,
            _C.SCALE_RULES["pow2_mx"], 1.0, 2**31, 0, 0),
    }
    for name, call in cases.items():
        print("case:", name, flush=True)
        try:
            call()
        except ValueError as e:
            print("  ValueError:", e, flush=True)
        else:
            raise SystemExit(f"{name}: no ValueError")
    print("ok")
""")


def test_huge_sizes_and_exponents_raise_value_error():
    out = subprocess.run([sys.executable, "-c", CASES], capture_output=True, text=True,
                         check=False, timeout=180)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert out.stdout.strip().endswith("ok")


def test_size_errors_name_the_sizes():
    with pytest.raises(ValueError, match="4294967296 x 4294967296 exceeds 2\\^56"):
        _C.pack_w8(torch.zeros(0, dtype=torch.int8).numpy(), 2**32, 2**32)
    with pytest.raises(ValueError, match="emax must be in \\[-256, 256\\]"):
        checks.check_emax(-2**31)
    with pytest.raises(ValueError, match="exceeds 2\\^56"):
        checks.size_product("x", 2**32, 2**32)
    assert checks.size_product("x", 2**28, 2**28) == 2**56 == checks.MAX_SIZE


def test_sizes_at_the_limits_still_work():
    # the checks reject only what cannot exist: ordinary and empty shapes run as before
    codes = torch.randint(-128, 128, (20, 36), dtype=torch.int8).numpy()
    packed = _C.pack_w8(codes, 20, 36)
    assert packed.size == _C.w8_packed_nbytes(20, 36) == 32 * 36
    assert (_C.unpack_w8(packed, 20, 36).reshape(20, 36) == codes).all()
    assert _C.pack_w8(codes[:0], 0, 36).size == 0
    for emax in (-256, 0, 2, 8, 256):  # MX emax values: scale = 2^(floor(log2 amax) - emax)
        x = torch.tensor([3.0] * 32)
        _, scale, _ = torch.ops.qkern.quantize_affine_dynamic(
            x, 32, -127, 127, _C.SCALE_RULES["pow2_mx"], 1.0, emax, 0, 0, 0.0, 0)
        assert scale.item() == 2.0 ** max(-127, min(127, 1 - emax))
