"""qkern.fixed_point and qkern::requantize against a pure-Python reference written from
gemmlowp's fixedpoint.h / TFLite's MultiplyByQuantizedMultiplier (tests/fixedpoint_ref.py):
exhaustive edge cases (INT32_MIN / MAX, every shift, ties), 10^6 random values on every ISA,
per-channel / per-tensor, zero points and folded-ReLU clamps, thread counts, bad input."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import fixedpoint_ref as R
import isas
import qkern
from qkern import fixed_point as FP

I32 = torch.int32
OPS = torch.ops.qkern


def _edges() -> list[int]:
    v = {R.INT32_MIN, R.INT32_MIN + 1, R.INT32_MAX, R.INT32_MAX - 1, 0, 1, -1, 2, -2, 3, -3}
    for e in range(1, 31):  # powers of two, their neighbours, and the ties of every shift
        for base in (1 << e, (1 << e) + (1 << (e - 1)), 3 << (e - 1)):
            for d in (-1, 0, 1):
                for s in (1, -1):
                    if R.INT32_MIN <= s * (base + d) <= R.INT32_MAX:
                        v.add(s * (base + d))
    return sorted(v)


EDGES = _edges()
MULTS = [0, 1, -1, 2**30, 2**30 + 1, 2**31 - 1, 1518500250, 1690499128, R.INT32_MIN,
         R.INT32_MIN + 1, 12345, -(2**30)]


def t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=I32)


def test_srdhm_every_edge_pair():
    a, b = zip(*itertools.product(EDGES, EDGES))
    got = FP.saturating_rounding_doubling_high_mul(t(list(a)), t(list(b))).tolist()
    assert got == [R.srdhm(x, y) for x, y in zip(a, b)]
    assert int(FP.saturating_rounding_doubling_high_mul(t(R.INT32_MIN), t(R.INT32_MIN))) \
        == R.INT32_MAX


def test_rounding_divide_by_pot_every_shift():
    for e in range(32):
        got = FP.rounding_divide_by_pot(t(EDGES), e).tolist()
        assert got == [R.rdbpot(x, e) for x in EDGES], e
    # ties round away from zero
    assert FP.rounding_divide_by_pot(t([6, -6, 2, -2, 10, -10]), 2).tolist() == [2, -2, 1, -1,
                                                                                   3, -3]
    # numpy in, numpy out; a tensor of exponents broadcasts
    x = np.array(EDGES[:64], dtype=np.int32)
    got = FP.rounding_divide_by_pot(x, np.arange(64, dtype=np.int32) % 32)
    assert isinstance(got, np.ndarray)
    assert got.tolist() == [R.rdbpot(int(v), i % 32) for i, v in enumerate(x)]


@pytest.mark.parametrize("isa", isas.params())
def test_mbqm_edges_every_shift_on_every_isa(isa):
    isas.use(isa)
    cases = [(x, m, s) for x in EDGES[::3] + [R.INT32_MIN, R.INT32_MAX] for m in MULTS
             for s in range(-31, 31)]
    x, m, s = (t(list(c)) for c in zip(*cases))
    got = FP.multiply_by_quantized_multiplier(x, m, s).tolist()
    assert got == [R.mbqm(*c) for c in cases]


@pytest.fixture(scope="module")
def random_case():
    """10^6 random accumulators with random multipliers / shifts, the reference in Python ints."""
    g = np.random.default_rng(7)
    n = 1_000_000
    x = np.concatenate([g.integers(R.INT32_MIN, R.INT32_MAX, n // 2, endpoint=True),
                        g.integers(-(2**20), 2**20, n // 2)]).astype(np.int32)
    m = g.integers(2**30, 2**31, n).astype(np.int32)
    s = g.integers(-31, 31, n).astype(np.int32)
    ref = [R.mbqm(a, b, c) for a, b, c in zip(x.tolist(), m.tolist(), s.tolist())]
    return x, m, s, np.array(ref, dtype=np.int64)


@pytest.mark.parametrize("isa", isas.params())
def test_mbqm_random_million_on_every_isa(isa, random_case):
    isas.use(isa)
    x, m, s, ref = random_case
    got = FP.multiply_by_quantized_multiplier(x, m, s)
    assert isinstance(got, np.ndarray) and got.dtype == np.int32
    np.testing.assert_array_equal(got.astype(np.int64), ref)


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("per_channel", [True, False])
def test_requantize_op_int8_vs_reference(isa, per_channel):
    """Per-channel / per-tensor, zero points, ReLU clamps, channel counts with SIMD tails."""
    isas.use(isa)
    g = np.random.default_rng(3)
    for rows, ch, zp, qmin, qmax in [(7, 37, -5, -128, 127), (3, 16, 0, 0, 127),
                                     (2, 100, 17, 17, 127), (1, 1, -128, -128, 127),
                                     (5, 8, 3, -100, 90)]:
        acc = g.integers(-(2**24), 2**24, (rows, ch)).astype(np.int32)
        acc[0, : min(ch, 4)] = [R.INT32_MIN, R.INT32_MAX, 0, -1][: min(ch, 4)]
        nm = ch if per_channel else 1
        m = g.integers(2**30, 2**31, nm).astype(np.int32)
        s = g.integers(-31, 5, nm).astype(np.int32)
        out = OPS.requantize(torch.from_numpy(acc), torch.from_numpy(m), torch.from_numpy(s),
                             zp, qmin, qmax, 8)
        assert out.dtype == torch.int8 and out.shape == (rows, ch)
        ref = [[R.requantize(int(acc[r, c]), int(m[c % nm]), int(s[c % nm]), zp, qmin, qmax)
                for c in range(ch)] for r in range(rows)]
        assert out.tolist() == ref, (rows, ch, zp)


def test_requantize_isas_and_threads_agree():
    g = np.random.default_rng(5)
    acc = torch.from_numpy(g.integers(-(2**26), 2**26, (300, 777)).astype(np.int32))
    m = torch.from_numpy(g.integers(2**30, 2**31, 777).astype(np.int32))
    s = torch.from_numpy(g.integers(-20, 3, 777).astype(np.int32))
    qkern.set_isa("scalar")
    want = OPS.requantize(acc, m, s, -3, -128, 127, 8)
    for isa in isas.HAVE:
        for threads in (1, 2):
            qkern.set_isa(isa)
            qkern.set_num_threads(threads)
            assert torch.equal(OPS.requantize(acc, m, s, -3, -128, 127, 8), want), (isa, threads)


def _exact_bound(scale: float, m0: int, shift: int) -> bool:
    """|m0 2^(shift-31) - scale| <= 2^(shift-32) (half an ulp of the 31-bit mantissa)."""
    err = abs(Fraction(m0) * Fraction(2) ** (shift - 31) - Fraction(scale))
    return err <= Fraction(2) ** (shift - 32)


def test_requantize_multiplier_vs_tflite_rule():
    g = np.random.default_rng(11)
    scales = [0.5, 1.0, 2.0, 3.0, 0.0123, 1e-9, 2.0**-31, 2.0**-32, 2.0**-33, 1.0 - 2.0**-40,
              0.25 * (1 - 2.0**-33), 2.0**29, 1.5 * 2.0**29] + g.uniform(1e-6, 4.0, 500).tolist()
    for sc in scales:
        m0, shift = FP.requantize_multiplier(sc)
        assert (m0, shift) == R.quantize_multiplier(sc), sc
        if m0:
            assert 2**30 <= m0 < 2**31 and -31 <= shift <= 30
            assert _exact_bound(sc, m0, shift), sc
    assert FP.requantize_multiplier(0.0) == (0, 0)
    assert FP.requantize_multiplier(1.0 - 2.0**-40) == (2**30, 1)  # q_fixed == 2^31 case
    assert FP.requantize_multiplier(2.0**-40) == (0, 0)  # below 2^-32: flushed
    m0, sh = FP.quantize_multipliers(torch.tensor([0.5, 3.0], dtype=torch.float64))
    assert m0.tolist() == [2**30, 1610612736] and sh.tolist() == [0, 2]


def test_requantize_multiplier_then_mbqm_rescales():
    """x * scale through (m0, shift) is within 1 of round(x * scale) (two roundings)."""
    g = np.random.default_rng(2)
    for sc in g.uniform(1e-4, 0.9, 50).tolist() + [1.0, 1.7, 5.25]:
        m0, sh = FP.requantize_multiplier(sc)
        x = g.integers(-(2**20), 2**20, 200).astype(np.int32)
        got = FP.multiply_by_quantized_multiplier(x, m0, sh).astype(np.int64)
        assert np.abs(got - np.round(x.astype(np.float64) * sc)).max() <= 1


@pytest.mark.parametrize("bad,exc", [(-0.5, ValueError), (math.nan, ValueError),
                                     (math.inf, ValueError), (2.0**30, ValueError),
                                     ("1", TypeError), (True, TypeError)])
def test_requantize_multiplier_errors(bad, exc):
    with pytest.raises(exc):
        FP.requantize_multiplier(bad)


def test_bad_input_errors():
    acc = torch.zeros(2, 4, dtype=I32)
    one = t([2**30])
    with pytest.raises(TypeError, match="int32"):
        FP.multiply_by_quantized_multiplier(torch.zeros(3), 2**30, 0)
    with pytest.raises(ValueError, match="shift"):
        FP.multiply_by_quantized_multiplier(acc, 2**30, 31)
    with pytest.raises(ValueError, match="exponent"):
        FP.rounding_divide_by_pot(acc, 32)
    with pytest.raises(ValueError, match="shift"):
        OPS.requantize(acc, one, t([-32]), 0, -128, 127, 8)
    with pytest.raises(ValueError, match="per channel"):
        OPS.requantize(acc, t([1, 2, 3]), t([0, 0, 0]), 0, -128, 127, 8)
    with pytest.raises(ValueError, match="qmin"):
        OPS.requantize(acc, one, t([0]), 0, -129, 127, 8)
    with pytest.raises(ValueError, match="out_bits"):
        OPS.requantize(acc, one, t([0]), 0, -128, 127, 16)
    with pytest.raises(TypeError, match="acc"):
        OPS.requantize(acc.long(), one, t([0]), 0, -128, 127, 8)
