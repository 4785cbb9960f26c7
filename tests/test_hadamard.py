"""qkern::fwht and qkern.hadamard against scipy.linalg.hadamard / dense float64 products:
values on every ISA, bit-identical ISAs and thread counts, dtypes, errors, gradients, and the
Paley-based Hadamard matrices (H H^T = n I)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard as scipy_hadamard

import qkern
from qkern import _C
from qkern.hadamard import (
    base_order,
    fwht,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard,
    random_signs,
    supported_sizes,
)

ISAS = ["scalar"] + (["avx2"] if _C.cpu_has_avx2() else []) + (
    ["avx512"] if _C.cpu_has_avx512() else [])


def _ref(x: torch.Tensor) -> np.ndarray:
    """x H_n / sqrt(n) in float64 with scipy's Sylvester matrix."""
    n = x.shape[-1]
    return x.double().numpy() @ scipy_hadamard(n).astype(np.float64) / math.sqrt(n)


@pytest.mark.parametrize("isa", ISAS)
def test_fwht_matches_scipy_on_every_isa(isa):
    qkern.set_isa(isa)
    assert qkern.get_isa() == isa
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048):
        x = torch.randn(2, 3, n, generator=g)
        y = fwht(x)
        assert y.shape == x.shape and y.dtype == torch.float32
        np.testing.assert_allclose(y.numpy(), _ref(x), rtol=0, atol=2e-5 * math.log2(2 * n),
                                   err_msg=f"{isa} n={n}")


def test_isas_and_thread_counts_agree_bit_for_bit():
    """Every path performs the same float operations in the same order (csrc/cpu/hadamard)."""
    g = torch.Generator().manual_seed(2)
    for n in (1, 4, 8, 16, 32, 4096, 8192, 16384):  # > 4096: the blocked passes
        x = torch.randn(9, n, generator=g) * 10
        qkern.set_isa("scalar")
        want = fwht(x)
        for isa in ISAS:
            for threads in (1, 2):
                qkern.set_isa(isa)
                qkern.set_num_threads(threads)
                assert torch.equal(fwht(x), want), (isa, threads, n)


def test_large_rows_match_reference_and_are_self_inverse():
    x = torch.randn(3, 16384, generator=torch.Generator().manual_seed(3))
    y = fwht(x)
    h = torch.from_numpy(scipy_hadamard(128).astype(np.float64))
    # H_16384 = H_128 (x) H_128 (Sylvester), so x H = H^T X H on x viewed as (128, 128)
    ref = (h.T @ x.double().view(3, 128, 128) @ h).reshape(3, -1) / 128.0
    np.testing.assert_allclose(y.numpy(), ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(fwht(y).numpy(), x.numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_in_and_out(dtype):
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = fwht(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, fwht(x.float()).to(dtype))  # computed in float32, rounded once


def test_empty_and_strided_inputs():
    assert fwht(torch.zeros(0, 8)).shape == (0, 8)
    x = torch.randn(8, 6)[:, :4]  # non-contiguous
    np.testing.assert_allclose(fwht(x).numpy(), _ref(x), atol=1e-6)
    np.testing.assert_allclose(fwht(x.T.contiguous().T).numpy(), _ref(x), atol=1e-6)


@pytest.mark.parametrize("n", [0, 3, 6, 12, 1000])
def test_non_power_of_two_rejected(n):
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(2, n))
    with pytest.raises(ValueError, match="power of two"):
        torch.ops.qkern.fwht(torch.zeros(2, n))
    if n:
        with pytest.raises(ValueError, match="power of two"):
            _C.fwht_raw(0, 0, 2, n)


def test_bad_dtypes_and_shapes_rejected():
    with pytest.raises(TypeError, match="float32"):
        fwht(torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        fwht(torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="float32"):
        torch.ops.qkern.fwht(torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="Tensor"):
        fwht(np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="at least one dimension"):
        fwht(torch.tensor(1.0))
    with pytest.raises(ValueError, match="null pointer"):
        _C.fwht_raw(0, 0, 2, 8)
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="overlap"):
        _C.fwht_raw(x.data_ptr(), x.data_ptr() + 4, 2, 8)
    y = x.clone() + 1
    _C.fwht_raw(y.data_ptr(), y.data_ptr(), 4, 8)  # in place
    np.testing.assert_allclose(y.numpy(), _ref(x + 1), atol=1e-6)
    with pytest.raises(ValueError, match="2\\^56"):
        _C.fwht_raw(0, 0, 1 << 50, 1 << 10)


def test_opcheck():
    torch.library.opcheck(torch.ops.qkern.fwht, (torch.randn(3, 16),))
    torch.library.opcheck(torch.ops.qkern.fwht, (torch.randn(2, 2, 8, requires_grad=True),))


def test_gradients_equal_dense_matmul_gradients():
    """d/dx of sum(w * f(x)) against the same loss through the dense float64 matrix."""
    g = torch.Generator().manual_seed(5)
    for n, fn, mat in (
        (64, fwht, lambda n: torch.from_numpy(scipy_hadamard(n).astype(np.float64)) / 8.0),
        (48, lambda x: hadamard_transform(x, random_signs(48, 7)),
         lambda n: random_hadamard(n, 7)),
        (24, lambda x: hadamard_transform(x, random_signs(24, 3), transpose=True),
         lambda n: random_hadamard(n, 3).T),
    ):
        x = torch.randn(5, n, generator=g)
        w = torch.randn(5, n, generator=g)
        x32 = x.clone().requires_grad_(True)
        (fn(x32) * w).sum().backward()
        x64 = x.double().requires_grad_(True)
        ((x64 @ mat(n)) * w.double()).sum().backward()
        np.testing.assert_allclose(x32.grad.numpy(), x64.grad.numpy(), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient")
def test_gradcheck_of_the_fwht_op():
    """torch.autograd.gradcheck in float32 (the kernel's dtype) with a loose tolerance: the
    transform is linear, so finite differences are exact up to rounding."""
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(6), requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.qkern.fwht, (x,), eps=1e-2, atol=1e-3,
                                    rtol=1e-3, fast_mode=False)


# ---- Hadamard matrices ------------------------------------------------------------------------

def test_sylvester_equals_scipy():
    for n in (1, 2, 4, 32, 256):
        np.testing.assert_array_equal(hadamard_matrix(n).numpy(), scipy_hadamard(n))


def test_supported_sizes_up_to_100():
    """Every multiple of 4 up to 88 has a Hadamard matrix here; 92 needs Williamson's
    construction (not implemented)."""
    want = [1, 2] + [n for n in range(4, 101, 4) if n != 92]
    assert supported_sizes(100) == want
    assert base_order(14336) == 28 and base_order(11008) == 344 and base_order(12288) == 12
    assert base_order(672) == 84 and base_order(4096) == 1


@pytest.mark.parametrize("m", [12, 20, 28, 36, 40, 44, 52, 60, 84, 108, 344])
def test_paley_matrices_are_hadamard(m):
    h = hadamard_matrix(m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))
    h2 = hadamard_matrix(2 * m)
    assert torch.equal(h2 @ h2.T, 2 * m * torch.eye(2 * m, dtype=torch.float64))


@pytest.mark.parametrize("n", [0, -4, 3, 6, 10, 92, 184, 2.0, True])
def test_unsupported_sizes_rejected(n):
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [16, 12, 40, 96, 672])
def test_random_hadamard_and_transform(n):
    q = random_hadamard(n, seed=11)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    s = random_signs(n, 11)
    assert torch.equal(q, hadamard_matrix(n) * s.double() / math.sqrt(n))
    x = torch.randn(3, 2, n, generator=torch.Generator().manual_seed(n))
    np.testing.assert_allclose(hadamard_transform(x, s).numpy(), (x.double() @ q).numpy(),
                               atol=2e-5)
    np.testing.assert_allclose(hadamard_transform(x, s, transpose=True).numpy(),
                               (x.double() @ q.T).numpy(), atol=2e-5)
    np.testing.assert_allclose(hadamard_transform(x).numpy(),
                               (x.double() @ hadamard_matrix(n) / math.sqrt(n)).numpy(),
                               atol=2e-5)
    y = hadamard_transform(x.bfloat16(), s)
    assert y.dtype == torch.bfloat16


def test_transform_errors():
    with pytest.raises(ValueError, match="signs must have shape"):
        hadamard_transform(torch.zeros(2, 12), torch.ones(8))
    with pytest.raises(ValueError, match="Hadamard matrix of order 92"):
        hadamard_transform(torch.zeros(2, 92))
    with pytest.raises(TypeError, match="float32"):
        hadamard_transform(torch.zeros(2, 12, dtype=torch.int8))
