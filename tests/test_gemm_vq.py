"""qkern::gemm_vq (fused matmul over vector-quantized weights, csrc/cpu/gemm/vq) and VQLinear's
use of it, against a float64 numpy reference written from the definition (each vector of a row
its codebook entry times its segment's scale), on every ISA the CPU has and 1 / 2 threads:
every path (a codebook per layer, per 16 / 32 / 48 rows: the table path, kept in registers or
not; per 1 / 3 / 8 rows: the lanes path), uint8 and uint16 codes, scales, bias."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.library import opcheck

import isas
import qkern
from qkern.ops.vq import nibbles_fit, pack_codes, unpack_codes
from qkern.vq.linear import FUSED_MAX_ROWS, VQLinear

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in opcheck

OPS = torch.ops.qkern
# (N, nv, dim, kc, group_rows (None: one codebook), segments (None: no scales), M)
CASES = [
    (37, 24, 2, 16, None, None, 1),    # per layer, kc 16 (vpermps on AVX-512)
    (64, 32, 4, 256, None, None, 2),   # per layer, kc 256 (rows path: 32-column steps)
    (40, 10, 4, 64, None, None, 1),    # per layer, kc 64, 40 columns (table path, gathers)
    (48, 32, 2, 64, 16, 2, 2),         # 16-row codebooks of 64 2-d entries (rows path)
    (50, 16, 2, 32, 16, 4, 3),         # 16-row codebooks, kc 32, scales
    (70, 24, 2, 16, 16, 3, 2),         # 16-row codebooks in registers, N % 16 != 0
    (64, 20, 4, 8, 32, None, 1),       # 32-row codebooks in registers (AVX2 too: kc 8)
    (96, 40, 2, 16, 48, 5, 2),         # 48-row codebooks: a shared table over 3 blocks
    (48, 40, 1, 4, 1, 5, 1),           # a codebook per row (lanes path, tables in registers)
    (40, 32, 1, 16, 1, None, 2),       # 16 levels per row (AVX-512: 256 entries in registers)
    (24, 12, 2, 8, 8, 3, 1),           # 8-row codebooks of 8 2-d entries (registers)
    (30, 10, 4, 3, 5, None, 2),        # 3 entries (padded to 4) of 4-d vectors per 5 rows
    (33, 12, 8, 300, 8, 3, 2),         # uint16 codes, 8-row codebooks (lanes path)
    (20, 8, 2, 16, 3, None, 9),        # 3-row codebooks, M = 9
    (17, 6, 2, 1, None, 2, 4),         # a 1-entry codebook
]


def _data(n, nv, dim, kc, gr, nseg, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    gr = gr or n
    dtype = torch.uint8 if kc <= 256 else torch.uint16
    codes = torch.randint(0, kc, (n, nv), generator=g).to(dtype)
    books = torch.randn(-(-n // gr), kc, dim, generator=g)
    scales = None if nseg is None else torch.rand(n, nseg, generator=g) + 0.5
    return (torch.randn(m, nv * dim, generator=g), codes, books, scales,
            torch.randn(n, generator=g), gr)


def _reference(x, codes, books, scales, bias, gr) -> np.ndarray:
    """float64 y = x W^T + bias with W decoded from the definition, row by row."""
    c = codes.to(torch.int64).numpy()
    b = books.double().numpy()
    n, nv = c.shape
    w = np.empty((n, nv * b.shape[2]))
    for r in range(n):
        row = b[r // gr][c[r]]  # (nv, dim)
        if scales is not None:
            row = row * np.repeat(scales[r].double().numpy(), nv // scales.shape[1])[:, None]
        w[r] = row.reshape(-1)
    return x.double().numpy() @ w.T + bias.double().numpy()


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_reference_on_every_isa_and_thread_count(case):
    x, codes, books, scales, bias, gr = _data(*case)
    n, k = codes.shape[0], x.shape[1]
    ref = _reference(x, codes, books, scales, bias, gr)
    nib = codes.dtype == torch.uint8 and nibbles_fit(n, codes.shape[1], books.shape[1],
                                                     books.shape[0], gr, scales)
    got = {}
    for isa, threads in itertools.product(isas.HAVE, (1, 2)):
        isas.use(isa)
        qkern.set_num_threads(threads)
        got[isa, threads] = OPS.gemm_vq(x, pack_codes(codes), books, scales, bias, n, k, gr)
        if nib:  # 4-bit words: the same bits
            got[isa, threads, 4] = OPS.gemm_vq(x, pack_codes(codes, nibbles=True), books,
                                               scales, bias, n, k, gr)
    first = next(iter(got.values()))
    for key, y in got.items():  # the same bits everywhere (api.h float contract)
        assert torch.equal(y, first), key
    scale = np.abs(ref).max() + 1e-30
    assert np.abs(first.double().numpy() - ref).max() / scale < 1e-5


def test_nibble_packing_round_trips_and_is_used_where_it_fits():
    codes = torch.randint(0, 16, (37, 21), dtype=torch.uint8)
    for nib in (False, True):
        p = pack_codes(codes, nibbles=nib)
        assert p.shape == ((3, 3, 16) if nib else (3, 21, 16))
        for r0, r1 in ((0, 37), (16, 30), (32, 37)):
            assert torch.equal(unpack_codes(p, r0, r1, 21), codes[r0:r1])
    # word [b, w, l] bits 4j..4j+3 = code (16 b + l, 8 w + j), independent check of one word
    p = pack_codes(codes, nibbles=True)
    want = sum(int(codes[16 + 5, 8 + j]) << (4 * j) for j in range(8))
    assert int(p[1, 1, 5]) & 0xFFFFFFFF == want
    assert nibbles_fit(64, 32, 16, 1, 64, None) and nibbles_fit(64, 32, 16, 4, 16, None)
    assert not nibbles_fit(64, 32, 17, 1, 64, None)        # 17 entries
    assert not nibbles_fit(64, 32, 16, 8, 8, None)         # 8-row codebooks: the lanes path
    assert not nibbles_fit(64, 32, 16, 1, 64, torch.ones(64, 8))  # segments of 4 vectors
    with pytest.raises(ValueError, match="codes < 16"):
        pack_codes(torch.full((2, 2), 16, dtype=torch.uint8), nibbles=True)


def test_code_out_of_range_raises():
    x, codes, books, _, _, gr = _data(20, 8, 2, 16, None, None, 1)
    for isa in isas.HAVE:
        isas.use(isa)
        bad = codes.clone()
        bad[13, 5] = 16
        with pytest.raises(ValueError, match="code 16 is out of range for a codebook of 16"):
            OPS.gemm_vq(x, pack_codes(bad), books, None, None, 20, 16, gr)
        small = torch.randint(0, 12, (20, 16)).to(torch.uint8)  # 4-bit words, 12 entries
        small[5, 9] = 13
        with pytest.raises(ValueError, match="code 13 is out of range for a codebook of 12"):
            OPS.gemm_vq(torch.randn(1, 32), pack_codes(small, nibbles=True),
                        torch.randn(1, 12, 2), None, None, 20, 32, 20)
        lanes = torch.randint(0, 4, (20, 8)).to(torch.uint8)  # the lanes path (a row each)
        lanes[7, 3] = 4
        with pytest.raises(ValueError, match="code 4 is out of range for a codebook of 4"):
            OPS.gemm_vq(torch.randn(1, 8), pack_codes(lanes), torch.randn(20, 4, 1), None, None,
                        20, 8, 1)
        rows = torch.randint(0, 64, (20, 8)).to(torch.uint8)  # the rows path (kc > 32)
        rows[19, 7] = 200
        with pytest.raises(ValueError, match="code 200 is out of range for a codebook of 64"):
            OPS.gemm_vq(torch.randn(1, 32), pack_codes(rows), torch.randn(1, 64, 4), None, None,
                        20, 32, 20)
        wide = torch.randint(0, 300, (20, 8)).to(torch.uint16)
        wide[0, 0] = 300
        with pytest.raises(ValueError, match="out of range"):
            OPS.gemm_vq(x, pack_codes(wide), torch.randn(1, 300, 2), None, None, 20, 16, 20)


def test_bad_arguments_raise_clear_errors():
    x, codes, books, scales, bias, gr = _data(32, 8, 2, 16, 16, 2, 2)
    p = pack_codes(codes)
    with pytest.raises(TypeError, match="x must be a float"):
        OPS.gemm_vq(x[:, :5], p, books, None, None, 32, 16, gr)
    with pytest.raises(TypeError, match="packed must be"):
        OPS.gemm_vq(x, codes, books, None, None, 32, 16, gr)
    with pytest.raises(ValueError, match="3 codebooks for 32 rows"):
        OPS.gemm_vq(x, p, torch.randn(3, 16, 2), None, None, 32, 16, gr)
    with pytest.raises(ValueError, match="scales must be"):
        OPS.gemm_vq(x, p, books, torch.rand(32, 3), None, 32, 16, gr)
    with pytest.raises(ValueError, match="bias must have shape"):
        OPS.gemm_vq(x, p, books, scales, torch.randn(31), 32, 16, gr)
    with pytest.raises(ValueError, match="300 codebook entries"):
        OPS.gemm_vq(x, p, torch.randn(2, 300, 2), None, None, 32, 16, gr)
    with pytest.raises(ValueError, match="group_rows"):
        OPS.gemm_vq(x, p, books, None, None, 32, 16, 0)
    with pytest.raises(TypeError, match="uint8 or uint16"):
        pack_codes(codes.to(torch.int32))
    with pytest.raises(ValueError, match="4-bit words need"):  # 8-row codebooks: lanes path
        OPS.gemm_vq(x, pack_codes(codes, nibbles=True), torch.randn(4, 16, 2), None, None, 32,
                    16, 8)


def test_empty_shapes():
    books = torch.randn(1, 4, 2)
    y = OPS.gemm_vq(torch.randn(0, 6), pack_codes(torch.zeros(5, 3, dtype=torch.uint8)), books,
                    None, None, 5, 6, 5)
    assert y.shape == (0, 5)
    bias = torch.randn(5)
    y = OPS.gemm_vq(torch.randn(2, 0), pack_codes(torch.zeros(5, 0, dtype=torch.uint8)), books,
                    None, bias, 5, 0, 5)
    assert torch.equal(y, bias.expand(2, 5))


def test_gradient_of_x_and_bias_and_opcheck():
    x, codes, books, scales, bias, gr = _data(40, 10, 2, 16, 16, 5, 3)
    w = torch.from_numpy(_reference(torch.eye(20), codes, books, scales, torch.zeros(40), gr).T)
    xr = x.double().requires_grad_()
    br = bias.double().requires_grad_()
    (xr @ w.T + br).pow(2).sum().backward()
    xq, bq = x.clone().requires_grad_(), bias.clone().requires_grad_()
    OPS.gemm_vq(xq, pack_codes(codes), books, scales, bq, 40, 20, gr).pow(2).sum().backward()
    assert torch.allclose(xq.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(bq.grad.double(), br.grad, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="codebooks requires grad"):
        OPS.gemm_vq(x, pack_codes(codes), books.requires_grad_(), scales, bias, 40, 20, gr)
    opcheck(OPS.gemm_vq.default, (x, pack_codes(codes), books.detach(), scales, bias, 40, 20, gr))


def test_vqlinear_fused_forward_matches_decoded_weight():
    x, codes, books, scales, bias, gr = _data(48, 12, 2, 16, 16, 3, 1, seed=3)
    layer = VQLinear(codes, books.half(), scales.half(), bias, group_rows=gr)
    ref = torch.from_numpy(_reference(torch.eye(24), codes, books.half().float(),
                                      scales.half().float(), torch.zeros(48), gr).T).float()
    for rows in (1, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1):  # fused, fused, decoded
        xx = torch.randn(rows, 24)
        want = xx.double() @ ref.double().T + bias.double()
        assert torch.allclose(layer(xx).double(), want, rtol=1e-5, atol=1e-5)
    # a change to the codebooks in place reaches the next call (the packed operands are rebuilt)
    xx = torch.randn(1, 24)
    before = layer(xx)
    with torch.no_grad():
        layer.codebooks.mul_(2)
    assert torch.allclose(layer(xx) - bias, 2 * (before - bias), rtol=1e-3, atol=1e-3)
    # codebooks that require grad (fine-tuning) take the differentiable decoded path
    layer.codebooks.requires_grad_()
    layer(torch.randn(2, 24)).sum().backward()
    assert layer.codebooks.grad is not None and layer.codebooks.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk_bytes", [1, 4096, None], ids=["step", "4k", "default"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_vqlinear_decoded_path_by_chunks(case, chunk_bytes, monkeypatch):
    """Past FUSED_MAX_ROWS rows the exact mode decodes the weight by chunks of rows into a
    reused buffer (qkern.ops.vq.linear_decoded on qkern.ops.decoded): one chunk per step of
    rows (16, or a multiple of the codebook groups), a few, or the whole layer; with and
    without bias; against the float64 definition."""
    import qkern.ops.decoded as decoded

    if chunk_bytes is not None:
        monkeypatch.setattr(decoded, "CHUNK_BYTES", chunk_bytes)
    _, codes, books, scales, bias, gr = _data(*case)
    n, k = codes.shape[0], codes.shape[1] * books.shape[2]
    for b in (bias, None):
        layer = VQLinear(codes, books, scales, b, group_rows=gr)
        for rows in (FUSED_MAX_ROWS + 1, 70):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            want = _reference(x, codes, books, scales, torch.zeros(n) if b is None else b, gr)
            got = layer(x)
            assert got.shape == (rows, n) and got.dtype == torch.float32
            scale = np.abs(x.double().numpy()) @ np.abs(_reference(
                torch.eye(k), codes, books, scales, torch.zeros(n), gr)) + 1
            assert np.all(np.abs(got.double().numpy() - want) <= 1e-5 * scale), (case, rows)
    # a reused buffer: the same call twice gives the same bits, and a 3-D x keeps its shape
    x3 = torch.randn(2, 20, k)
    assert torch.equal(layer(x3), layer(x3)) and layer(x3).shape == (2, 20, n)


def test_vqlinear_compiles_fullgraph():
    x, codes, books, scales, bias, gr = _data(48, 16, 2, 16, 16, 2, 1, seed=5)
    layer = VQLinear(codes, books.half(), scales.half(), bias, group_rows=gr)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] > 0], ids=[str(c) for c in CASES])
def test_dequantize_vq_is_the_definition(case):
    _, codes, books, scales, _, gr = _data(*case)
    n, nv = codes.shape
    k = nv * books.shape[2]
    want = _reference(torch.eye(k), codes, books, scales, torch.zeros(n), gr).T  # (n, k) float64
    layouts = [pack_codes(codes)]
    if codes.dtype == torch.uint8 and nibbles_fit(n, nv, books.shape[1], books.shape[0], gr,
                                                  scales):
        layouts.append(pack_codes(codes, nibbles=True))
    for packed in layouts:
        for threads in (1, 2):
            qkern.set_num_threads(threads)
            w = OPS.dequantize_vq(packed, books, scales, n, k, gr)
            # one float32 product per weight (scale * entry): exact against float64's
            assert torch.equal(w, torch.from_numpy(want).float()), (packed.dtype, threads)
    bad = codes.clone()
    bad[0, 0] = books.shape[1] if books.shape[1] < 256 else 0
    if books.shape[1] < 256:
        with pytest.raises(ValueError, match="out of range"):
            OPS.dequantize_vq(pack_codes(bad), books, scales, n, k, gr)
