"""The CUDA matmuls' shared QK_HD helpers (csrc/core/matmul.h) called on the host against
numpy definitions and the CPU quantizer, and the argument errors of the ops, the raw
module and its emulator's checks (see test_cuda_gemm.py for the matmuls themselves)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

_cuda = pytest.importorskip("qkern._cuda",
                            reason="qkern._cuda not built (no nvcc or no GPU; QKERN_CUDA=ON)")

from cuda_gemm_data import (  # noqa: E402
    HAS_GPU,
    OPS,
    WHERE,
    make_w4,
    run,
    w4_args,
)
from qkern.ops import cuda as C  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ---- the shared QK_HD helpers (csrc/core/matmul.h), called on the host ---------------------------

MM = _cuda.host_mm
F32 = np.float32


def test_helper_conversions_exact():
    for u in (0, 1, 7, 8, 15, 255, 2 ** 20 + 3, 2 ** 23 - 1):
        assert MM.float_of_small_uint(u) == float(u)
    for b in range(256):
        for t in range(4):
            word = (0xA5C3E17F & ~(0xFF << (8 * t))) | (b << (8 * t))
            assert MM.float_of_s8(word, t) == float(b - 256 if b >= 128 else b), (b, t)


def test_helper_nibbles_follow_the_packed_layouts():
    rng = np.random.default_rng(0)
    for _ in range(200):
        u = rng.integers(0, 16, 8)
        # int4 tile layout (csrc/cpu/gemm/w4/api.h): byte j = u[j] | u[j + 4] << 4
        word = sum(int(u[j] | u[j + 4] << 4) << (8 * j) for j in range(4))
        assert [MM.w4_nibble(word, c) for c in range(8)] == list(u)
        assert MM.w4_low_nibbles(word).to_bytes(4, "little") == bytes(int(v) for v in u[:4])
        assert MM.w4_high_nibbles(word).to_bytes(4, "little") == bytes(int(v) for v in u[4:])
        # lut4: LSB-first nibble stream, element j in bits 4j .. 4j+3
        word = sum(int(u[j]) << (4 * j) for j in range(8))
        assert [MM.lut4_code(word, j) for j in range(8)] == list(u)
    # and on a real buffer: the word of row n, vector i of block b (docs/numerics.md offsets)
    q, _, _, w = make_w4(11, 64, 32, False, seed=4)
    flat = w["packed"].reshape(-1).numpy()
    for n in range(11):
        for k in range(0, 64, 8):
            b, i = k // 32, (k % 32) // 8
            off = ((n // 8) * 2 + b) * 128 + 32 * i + 4 * (n % 8)
            word = int.from_bytes(flat[off: off + 4].tobytes(), "little")
            assert [MM.w4_nibble(word, c) - 8 for c in range(8)] == q[n, k: k + 8].tolist()


def test_helper_dot4_and_block_dot():
    rng = np.random.default_rng(1)
    for _ in range(500):
        a, b = rng.integers(-128, 128, 4), rng.integers(-128, 128, 4)
        c = int(rng.integers(-2 ** 20, 2 ** 20))
        wa = int.from_bytes(a.astype(np.int8).tobytes(), "little")
        wb = int.from_bytes(b.astype(np.int8).tobytes(), "little")
        assert MM.dot4_s8(wa, wb, c) == int(a @ b) + c
        du, z, xs = int(rng.integers(-60960, 60961)), int(rng.integers(-8, 8)), \
            int(rng.integers(-4064, 4065))
        assert MM.w4_block_dot(du, 8.0 + z, float(xs)) == du - (8 + z) * xs


def w4_block_ref(x):
    """Fast-mode block quantization from docs/numerics.md, in numpy float32."""
    x = np.asarray(x, F32)
    if not np.isfinite(x).all():
        return [0] * len(x), float("nan"), 0
    d = F32(np.abs(x).max() / F32(127))
    if d < np.finfo(F32).tiny:
        return [0] * len(x), 0.0, 0
    q = np.clip(np.rint(x * (F32(1) / d)), -127, 127).astype(np.int64)
    return q.tolist(), float(d), int(q.sum())


def test_helper_w4_quantize_block():
    rng = np.random.default_rng(2)
    blocks = [rng.standard_normal(32) * 10 ** rng.uniform(-3, 3) for _ in range(50)]
    blocks += [np.zeros(32), np.full(32, 1e-40), np.arange(-16, 16) / 4 * 127 / 4,
               np.r_[rng.standard_normal(31), np.nan], np.r_[np.inf, rng.standard_normal(31)],
               np.full(32, -3e38)]
    for xb in blocks:
        codes, d, s = MM.w4_quantize_block(np.asarray(xb, F32).tolist())
        rc, rd, rs = w4_block_ref(xb)
        assert codes == rc and s == rs
        assert (np.isnan(d) and np.isnan(rd)) or d == rd


def test_helper_w8a8_row_matches_the_cpu_quantizer():
    rng = np.random.default_rng(3)
    for k in (1, 7, 100, 1000):
        for scale in (1e-42, 1e-3, 1.0, 1e30):
            x = (rng.standard_normal(k) * scale).astype(F32)
            x[:: max(1, k // 5)] = np.round(x[:: max(1, k // 5)] * 4) / 4
            codes, sx = MM.w8a8_row(x.tolist())
            c_ref, s_ref, _ = OPS.quantize_affine_dynamic(torch.from_numpy(x).view(1, k), k,
                                                          -127, 127, 0, 127.0, 0, 0, 0, 0.0, 0)
            assert codes == c_ref.view(torch.int8).reshape(-1).tolist()
            assert sx == float(s_ref[0])
    for acc, sx, sw, b in [(123456, 0.01, -0.5, 0.25), (-(2 ** 30) - 7, 3e-5, 7e-3, None),
                           (0, 1.0, -2.0, None)]:
        v = F32(F32(F32(acc) * F32(sx)) * F32(sw))
        if b is not None:
            v = F32(v + F32(b))
        got = MM.w8a8_value(acc, sx, sw, b)
        assert np.asarray(got, F32).view(np.uint32) == v.view(np.uint32)


# ---- argument errors, the raw module and its emulator's checks ----------------------------------

@pytest.mark.parametrize("where", WHERE)
def test_w4_errors(where):
    n, k, group = 8, 64, 32
    _, _, _, w = make_w4(n, k, group, True)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match="mode must be"):
        run(where, "gemm_w4", x, *w4_args(w, None, n, k, group, 2))
    with pytest.raises(ValueError, match=r"x must be \(..., K = 32\)"):
        run(where, "gemm_w4", x, *w4_args(w, None, n, 32, group, 0))
    with pytest.raises(ValueError, match="tile layout"):
        run(where, "gemm_w4", x, w["packed"], w["scales"].view(n, -1), None, None, n, k, group, 0)
    with pytest.raises(ValueError, match="packed has"):
        run(where, "gemm_w4", x, w["packed"].reshape(-1)[:-16], w["scales"], None, None, n, k,
            group, 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        run(where, "gemm_w4", x, *w4_args(w, None, n, k, 16, 0))
    with pytest.raises(ValueError, match="bias has"):
        run(where, "gemm_w4", x, *w4_args(w, torch.zeros(n + 1), n, k, group, 0))
    with pytest.raises(ValueError, match="path must be"):
        run(where, "gemm_w4", x, *w4_args(w, None, n, k, group, 0), path=7)


def test_device_mismatch_and_missing_gpu():
    _, _, _, w = make_w4(8, 64, 32, False)
    args = w4_args(w, None, 8, 64, 32, 0)
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        C.run_matmul("gemm_w4", torch.randn(1, 64), *args)
    if HAS_GPU:
        with pytest.raises(ValueError, match="expected a CPU tensor"):
            C.emulate("gemm_w4", torch.randn(1, 64).cuda(), *args)


def test_missing_cuda_module_message():
    # What the CUDA kernels of every op raise when qkern._cuda was not built.
    with pytest.raises(RuntimeError, match=r"qkern::gemm_w4: .*qkern._cuda is missing"):
        C._missing("gemm_w4")(torch.zeros(1))


def test_raw_emulator_checks():
    # Shapes the launchers refuse, and a vector-loaded buffer at an odd address: the raw
    # module says what is wrong instead of reading out of bounds.
    n, k, group = 8, 64, 32
    _, _, _, w = make_w4(n, k, group, False)
    x = torch.randn(1, k + 1)
    y = torch.empty(1, n)
    packed, scales = w["packed"].contiguous(), w["scales"].contiguous()
    common = (packed.data_ptr(), scales.data_ptr(), 0, 0, n, k, group, 0, 0, 0, 0, 0,
              y.data_ptr())
    with pytest.raises(ValueError, match="aligned"):
        _cuda.emulate_gemm_w4(x.data_ptr() + 4, 1, *common, 0, False)
    with pytest.raises(ValueError, match="group_size"):
        _cuda.emulate_gemm_w4(x.data_ptr(), 1, packed.data_ptr(), scales.data_ptr(), 0, 0, n, k,
                              48, 0, 0, 0, 0, 0, y.data_ptr(), 0, False)
    with pytest.raises(ValueError, match="mode"):
        _cuda.emulate_gemm_w4(x.data_ptr(), 1, packed.data_ptr(), scales.data_ptr(), 0, 0, n, k,
                              group, 3, 0, 0, 0, 0, y.data_ptr(), 0, False)
    with pytest.raises(ValueError, match="K exceeds"):
        _cuda.emulate_gemm_w8a8(0, 1, 0, 0, 0, 1, 200000, 0, 0, 0, 0, 0, False)
    # fast mode without its workspaces
    with pytest.raises(ValueError, match="invalid launch"):
        _cuda.emulate_gemm_w4(x.data_ptr(), 1, packed.data_ptr(), scales.data_ptr(), 0, 0, n, k,
                              group, 1, 0, 0, 0, 0, y.data_ptr(), 0, False)
