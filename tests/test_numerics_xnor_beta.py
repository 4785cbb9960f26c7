"""Issue 9: binary_xnor's beta is float32(S / K) with S = sum |x| and the division both in
float64 (docs/numerics.md "XNOR", now matching the kernels), not float32(S) / K; checked on
rows where the two differ, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import isas
from qkern.ops import bits


def _rows_where_definitions_differ(k: int, want: int) -> np.ndarray:
    g = np.random.default_rng(7)
    rows = []
    while len(rows) < want:
        x = g.standard_normal(k).astype(np.float32)
        s = np.abs(x.astype(np.float64)).sum()
        if np.float32(s / k) != np.float32(np.float32(s) / np.float32(k)):
            rows.append(x)
    return np.stack(rows)


@pytest.mark.parametrize("isa", isas.params())
def test_xnor_beta_is_float32_of_float64_mean(isa):
    isas.use(isa)
    k, n = 45, 3
    x = _rows_where_definitions_differ(k, 4)
    codes = torch.zeros((n, k), dtype=torch.uint8)  # every weight +1: popcount = #(x < 0)
    alpha = torch.ones(n)
    y = torch.ops.qkern.gemm_binary(torch.from_numpy(x), bits.pack_binary(codes), alpha, None,
                                    n, k, True).numpy()
    beta = (np.abs(x.astype(np.float64)).sum(1) / k).astype(np.float32)
    dot = (k - 2 * (x < 0).sum(1)).astype(np.float32)
    ref = dot * beta  # alpha = 1
    np.testing.assert_array_equal(y, np.repeat(ref[:, None], n, 1))
    beta2 = np.float32(np.abs(x.astype(np.float64)).sum(1)).astype(np.float32) / np.float32(k)
    assert not np.array_equal(dot * beta2, ref)  # the old documented rule gives other bits
