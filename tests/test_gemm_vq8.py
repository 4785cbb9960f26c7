"""qkern::gemm_vq8 (the VQ matmul's int8 fast mode, csrc/cpu/gemm/vq8) against a numpy
reference written from its definition (api.h): x quantized per row and block of 32 (amax / 127,
round half to even, clamp to +-127), exact int64 dot products with the int8 codebook entries,
float32 accumulation in block order; bit for bit on every ISA and 1 / 2 threads. VQLinear's
fast mode, its save / load and gradient."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.library import opcheck

import isas
import qkern
from qkern.ops import NonFiniteError
from qkern.ops.vq import decode_vq
from qkern.ops.vq8 import (
    pack_codes4,
    quantize_codebooks,
    run_gemm_vq8,
    unpack_codes4,
    vq8_fits,
    vq8_tables,
)
from qkern.vq.linear import VQLinear

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in opcheck

OPS = torch.ops.qkern
F32 = np.float32
# (N, K, dim, kc, group_rows (None: one codebook), segments (None: no scales), M)
CASES = [
    (64, 256, 4, 256, None, None, 1),  # per layer, 256 entries (two VBMI look-ups + blend)
    (37, 128, 4, 256, None, 2, 3),     # N % 16 != 0, scales per 64 columns, odd M
    (48, 64, 2, 16, 16, 1, 2),         # 16-row codebooks of 16 2-d entries, one scale/row
    (40, 96, 8, 128, 32, 3, 1),        # dim 8, 128 entries, 32-row codebooks
    (33, 64, 4, 60, None, None, 5),    # 60 entries (one register per plane)
    (32, 32, 2, 100, 16, None, 2),     # 100 entries (two registers per plane)
    (40, 128, 2, 16, 16, 2, 3),        # 16-row codebooks of 16 entries: 4-bit codes too
    (24, 64, 4, 9, None, None, 1),     # 9 entries: 4-bit codes too
    # avx2's 1-3 row path: 3 rows' dot tables (3 x 5504 vectors x 1 KiB) pass its 16 MiB cap,
    # so the rows go in two batches
    (16, 11008, 2, 256, None, 43, 3),
    # from 16 rows the amx level's tile path: whole 16-row tiles, 8+ rows left padded to a
    # tile, fewer on the AVX-512 kernel; blocks of 32 in chunks of 4 (K = 320: 10 blocks)
    (64, 256, 4, 256, None, None, 16),
    (37, 128, 4, 256, None, 2, 21),
    (48, 64, 2, 16, 16, 1, 24),
    (40, 96, 8, 128, 32, 3, 40),
    (33, 320, 4, 60, None, 5, 33),
    (32, 320, 2, 100, 16, None, 17),
]


def _data(n, k, dim, kc, gr, nseg, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    gr = gr or n
    codes = torch.randint(0, kc, (n, k // dim), generator=g).to(torch.uint8)
    books8 = torch.randint(-127, 128, (-(-n // gr), kc, dim), generator=g).to(torch.int8)
    bs = torch.rand(books8.shape[0], generator=g) * 0.01 + 0.001
    scales = None if nseg is None else torch.rand(n, nseg, generator=g) + 0.5
    x = torch.randn(m, k, generator=g) * torch.linspace(0.1, 3.0, k)
    return x, codes, books8, bs, scales, torch.randn(n, generator=g), gr


def _reference(x, codes, books8, bs, scales, bias, gr) -> np.ndarray:
    xs = x.numpy().astype(F32)
    m, k = xs.shape
    c = codes.numpy().astype(np.int64)
    b8 = books8.numpy().astype(np.int64)
    n, nv = c.shape
    nblk = k // 32
    xb = xs.reshape(m, nblk, 32)
    amax = np.abs(xb).max(axis=2)
    dx = (amax / F32(127)).astype(F32)
    dx[dx < np.finfo(F32).tiny] = 0
    r = np.where(dx > 0, F32(1) / np.where(dx > 0, dx, 1), 0).astype(F32)
    xq = np.clip(np.rint((xb * r[:, :, None]).astype(F32)), -127, 127).astype(np.int64)
    y = np.empty((m, n), dtype=F32)
    for row in range(n):
        w = b8[row // gr][c[row]].reshape(nblk, 32)  # (nblk, 32) int
        s = np.ones(nblk, F32) if scales is None else np.repeat(
            scales[row].numpy().astype(F32), nblk // scales.shape[1])
        for i in range(m):
            acc = F32(0)
            for blk in range(nblk):
                d = int((w[blk] * xq[i, blk]).sum())
                acc = F32(acc + F32(F32(d) * F32(dx[i, blk] * s[blk])))
            v = F32(acc * F32(bs[row // gr]))
            y[i, row] = F32(v + F32(bias[row]))
    return y


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_reference_bit_for_bit_on_every_isa_and_thread_count(case):
    x, codes, books8, bs, scales, bias, gr = _data(*case)
    n, k = codes.shape[0], x.shape[1]
    ref = _reference(x, codes, books8, bs, scales, bias, gr)
    layouts = [False] + ([True] if vq8_fits(n, codes.shape[1], books8.shape[1], books8.shape[2],
                                            books8.shape[0], gr, None if scales is None
                                            else scales.shape[1], nibbles=True) else [])
    for isa, threads, nib in itertools.product(isas.HAVE, (1, 2), layouts):
        isas.use(isa)
        qkern.set_num_threads(threads)
        y = OPS.gemm_vq8(x, pack_codes4(codes, nibbles=nib), books8, bs, scales, bias, n, k, gr)
        np.testing.assert_array_equal(y.numpy(), ref, err_msg=f"{isa} {threads} threads {nib}")


def test_large_layer_close_to_float_and_threads_agree():
    """4096 x 1024 at dim 4, 256 entries: the threaded split gives the same bits, and the
    result is the float product of the int8 weight to int8-activation accuracy."""
    g = torch.Generator().manual_seed(1)
    n, k = 1024, 4096
    codes = torch.randint(0, 256, (n, k // 4), generator=g).to(torch.uint8)
    books8, bs = quantize_codebooks(torch.randn(1, 256, 4, generator=g))
    x = torch.randn(2, k, generator=g)
    p = pack_codes4(codes)
    qkern.set_num_threads(1)
    y1 = OPS.gemm_vq8(x, p, books8, bs, None, None, n, k, n)
    qkern.set_num_threads(2)
    assert torch.equal(OPS.gemm_vq8(x, p, books8, bs, None, None, n, k, n), y1)
    w = decode_vq(codes, books8.float() * bs.view(-1, 1, 1), None, n).double()
    ref = x.double() @ w.T
    assert float((y1.double() - ref).norm() / ref.norm()) < 0.01


def test_codebook_quantization_and_packing():
    books = torch.tensor([[[1.0, -2.0], [0.5, 0.25]], [[0.0, 0.0], [0.0, 0.0]]])
    b8, bs = quantize_codebooks(books)
    assert bs.tolist() == [pytest.approx(2.0 / 127), 1.0]
    # round(v / (2 / 127)): 63.5 -> 64 (half to even), 31.75 -> 32, 15.875 -> 16
    assert b8[0].tolist() == [[64, -127], [32, 16]] and b8[1].abs().sum() == 0
    codes = torch.randint(0, 256, (37, 12), dtype=torch.uint8)
    p = pack_codes4(codes)
    assert p.shape == (3, 3, 16, 4) and int(p[1, 2, 5, 3]) == int(codes[16 + 5, 4 * 2 + 3])
    for r0, r1 in ((0, 37), (16, 30), (32, 37)):
        assert torch.equal(unpack_codes4(p, r0, r1), codes[r0:r1])
    small = codes[:, :8] % 16
    p4 = pack_codes4(small, nibbles=True)  # byte [b, h, l, t]: vectors 8h + t and 8h + 4 + t
    assert p4.shape == (3, 1, 16, 4)
    assert int(p4[2, 0, 3, 1]) == int(small[35, 1]) | int(small[35, 5]) << 4
    assert torch.equal(unpack_codes4(p4, 16, 37, nibbles=True), small[16:])
    with pytest.raises(ValueError, match="4-bit"):
        pack_codes4(codes[:, :8], nibbles=True)


@pytest.mark.parametrize("m", [1, 3, 5])
def test_a_code_past_the_codebook_raises_on_every_isa(m):
    """100 entries (8-bit codes): a code of 200 reads 0 from every path's tables (the dot
    tables of avx2's 1-3 row path too) and the largest code read is reported."""
    x, codes, books8, bs, scales, bias, gr = _data(64, 128, 4, 100, None, None, m)
    codes[37, 5] = 200
    for isa in isas.HAVE:
        isas.use(isa)
        with pytest.raises(ValueError, match="code 200 is out of range"):
            OPS.gemm_vq8(x, pack_codes4(codes), books8, bs, scales, bias, 64, 128, gr)


def test_bad_input_raises_clear_errors():
    x, codes, books8, bs, scales, bias, gr = _data(48, 64, 2, 16, 16, 1, 2)
    p = pack_codes4(codes)
    bad = codes.clone()
    bad[40, 3] = 200
    with pytest.raises(ValueError, match="code 200 is out of range"):
        OPS.gemm_vq8(x, pack_codes4(bad), books8, bs, scales, bias, 48, 64, gr)
    with pytest.raises(NonFiniteError, match="NaN"):
        OPS.gemm_vq8(x.clone().fill_(float("nan")), p, books8, bs, scales, bias, 48, 64, gr)
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        OPS.gemm_vq8(x, p, books8.clone().fill_(-128), bs, scales, bias, 48, 64, gr)
    with pytest.raises(ValueError, match="unsupported shape"):  # group_rows 8
        OPS.gemm_vq8(x, p, torch.zeros(6, 16, 2, dtype=torch.int8), torch.ones(6), None, None,
                     48, 64, 8)
    with pytest.raises(TypeError, match="packed4"):
        OPS.gemm_vq8(x, codes, books8, bs, scales, bias, 48, 64, gr)
    with pytest.raises(TypeError, match="x must be"):
        OPS.gemm_vq8(x[:, :32], p, books8, bs, scales, bias, 48, 64, gr)
    with pytest.raises(ValueError, match="pack_codes4"):
        pack_codes4(torch.zeros(4, 6, dtype=torch.uint8))
    assert not vq8_fits(16, 12, 16, 2, 1, 16, None)  # K = 24: not a multiple of 32
    assert not vq8_fits(16, 8, 256, 8, 1, 16, None)  # 256 entries at dim 8


def test_opcheck_and_gradient_with_respect_to_x():
    x, codes, books8, bs, scales, bias, gr = _data(37, 128, 4, 256, None, 2, 3)
    args = (x, pack_codes4(codes), books8, bs, scales, bias, 37, 128, gr)
    opcheck(OPS.gemm_vq8.default, args)
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    OPS.gemm_vq8(xg, args[1], books8, bs, scales, bg, 37, 128, gr).pow(2).sum().backward()
    y = OPS.gemm_vq8(x, args[1], books8, bs, scales, bias, 37, 128, gr)
    w = decode_vq(codes, books8.float() * bs.view(-1, 1, 1), scales, gr)
    torch.testing.assert_close(xg.grad, (2 * y) @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bg.grad, (2 * y).sum(0))


def test_vqlinear_fast_mode_runs_the_int8_kernel_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (40, 32), dtype=torch.uint8, generator=g)
    books = torch.randn(1, 256, 4, generator=g).half()
    scales = (torch.rand(40, 2, generator=g) + 0.5).half()
    bias = torch.randn(40, generator=g)
    exact = VQLinear(codes, books, scales, bias, 40)
    fast = VQLinear(codes, books, scales, bias, 40, mode="fast")
    assert fast.fast_active and not exact.fast_active and "mode=fast" in repr(fast)
    small = VQLinear(codes % 16, books[:, :16], scales, bias, 40, mode="fast")
    assert small._vq_packed.shape == (3, 4, 16, 4)  # 4-bit codes: nv / 8 byte groups
    x1 = torch.randn(3, 128, generator=g)
    b16, bs16 = quantize_codebooks(books[:, :16])
    want = x1 @ decode_vq(codes % 16, b16.float() * bs16.view(-1, 1, 1), scales, 40).T + bias
    assert float((small(x1) - want).norm() / want.norm()) < 0.01
    b8, bs = quantize_codebooks(books)
    for rows in (1, 5, 33, 40):  # the kernel at every row count (amx: tiles from 16 rows)
        x = torch.randn(rows, 128, generator=g)
        want = x.double() @ decode_vq(codes, b8.float() * bs.view(-1, 1, 1), scales,
                                      40).double().T + bias.double()
        with torch.no_grad():
            got = fast(x)
            # each row's outputs are its own: the same bits as the row alone (M = 1, GEMV)
            assert all(torch.equal(got[i:i + 1], fast(x[i:i + 1])) for i in range(rows))
        assert float((got.double() - want).norm() / want.norm()) < 0.01
        assert float((got - exact(x)).norm() / exact(x).norm()) < 0.02
    x = torch.randn(2, 128, generator=g)
    with torch.no_grad():  # the eager decode path (no per-call checks) gives the op's bits
        eager = fast(x)
    op = OPS.gemm_vq8(x, fast._vq_packed, fast._vq8_books, fast._vq8_bs, fast._vq_scales,
                      fast._vq_bias, 40, 128, 40)
    assert torch.equal(eager, op) and torch.equal(fast(x), op)
    model = torch.nn.Sequential(torch.nn.Linear(128, 40))
    model[0] = fast
    qkern.save(model, tmp_path / "m")
    back = qkern.load(tmp_path / "m", torch.nn.Sequential(torch.nn.Linear(128, 40)))
    assert back[0].mode == "fast" and back[0].fast_active
    x = torch.randn(2, 128, generator=g)
    assert torch.equal(back(x), model(x))
    fast.mode = "exact"  # switching the mode rebuilds the operands
    assert torch.equal(fast(x), exact(x)) and not fast.fast_active
    with pytest.raises(ValueError, match="mode"):
        VQLinear(codes, books, scales, bias, 40, mode="quick")
    odd = VQLinear(torch.randint(0, 16, (16, 12), dtype=torch.uint8), torch.randn(1, 16, 2),
                   None, None, 16, mode="fast")  # K = 24: the exact path
    assert not odd.fast_active and odd(torch.randn(1, 24)).shape == (1, 16)


def test_prebuilt_tables_are_the_transposed_codebooks_and_give_the_same_bits():
    g = torch.Generator().manual_seed(5)
    books8, bs = quantize_codebooks(torch.randn(3, 200, 8 // 2, generator=g))  # 3 groups
    t = vq8_tables(books8)
    want = np.zeros((3, 4, 256), dtype=np.int8)  # numpy: [g, d, c] = books8[g, c, d], 0 past kc
    want[:, :, :200] = books8.numpy().transpose(0, 2, 1)
    np.testing.assert_array_equal(t.numpy(), want)
    n, k = 48, 128
    codes = torch.randint(0, 200, (n, k // 4), dtype=torch.uint8, generator=g)
    x = torch.randn(3, k, generator=g)
    scales = torch.rand(n, 2, generator=g) + 0.5
    p = pack_codes4(codes)
    for isa in isas.HAVE:
        isas.use(isa)
        y = run_gemm_vq8(x, p, books8, bs, scales, None, n, k, 16, t)
        assert torch.equal(y, OPS.gemm_vq8(x, p, books8, bs, scales, None, n, k, 16))
    # VQLinear keeps them; an in-place change of the codebooks rebuilds them
    layer = VQLinear(codes, torch.randn(3, 200, 4, generator=g), scales, None, 16, mode="fast")
    assert torch.equal(layer._vq8_tables, vq8_tables(layer._vq8_books))
    with torch.no_grad():
        layer.codebooks.mul_(-1)
        y = layer(x)
    assert torch.equal(layer._vq8_tables, vq8_tables(layer._vq8_books))
    assert torch.equal(y, OPS.gemm_vq8(x, layer._vq_packed, layer._vq8_books, layer._vq8_bs,
                                       layer._vq_scales, None, n, k, 16))
    with pytest.raises(TypeError, match="int8"):
        vq8_tables(books8.float())
    with pytest.raises(ValueError, match="1..256"):
        vq8_tables(torch.zeros(1, 300, 2, dtype=torch.int8))


def test_vqlinear_fast_mode_compiles_fullgraph():
    g = torch.Generator().manual_seed(4)
    layer = VQLinear(torch.randint(0, 256, (32, 16), dtype=torch.uint8, generator=g),
                     torch.randn(1, 256, 4, generator=g), None, None, 32, mode="fast")
    x = torch.randn(1, 64, generator=g)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), layer(x))
