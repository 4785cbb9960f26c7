"""Every vector path (AVX2, AVX-512) agrees with the scalar kernels bit for bit (codes, scales,
zero points, dequantized values); each path also against the numpy reference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import isas
import qkern
import reference as R
from _util import ALL_FORMATS, INT_FORMATS, np_codes, np_f32

VECTOR = isas.params(("avx2", "avx512"))


def _data(seed: int, shape) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[::13] *= 40.0  # saturating values for given scales
    flat[5::17] = np.round(flat[5::17] * 4) / 4  # quarter grid: exact ties when scale is 2^k
    flat[7::29] = 0.0
    flat[9::31] *= 1e-30
    return torch.from_numpy(x)


def _run(isa: str, fn, args, kwargs):
    qkern.set_isa(isa)
    assert qkern.get_isa() == isa
    try:
        return ("ok", fn(*args, **kwargs))
    except ValueError as e:
        return ("error", str(e))


def _summ(qt) -> dict:
    out = {"codes": np_codes(qt), "scale": np_f32(qt.scale).view(np.uint32),
           "deq": np_f32(qt.dequantize()).view(np.uint32)}
    if qt.zero_point is not None:
        out["zp"] = qt.zero_point.numpy()
    return out


def _q(*args, **kwargs) -> dict:
    return _summ(qkern.quantize(*args, **kwargs))


def _compare(isa: str, what: str, fn, *args, **kwargs) -> None:
    """fn(*args, **kwargs) on the scalar path, then on ``isa``'s: identical results."""
    what = f"{isa}: {what}"
    a, b = _run("scalar", fn, args, kwargs), _run(isa, fn, args, kwargs)
    assert a[0] == b[0], (what, a, b)
    if a[0] == "error":
        assert a[1] == b[1], what
        return
    if isinstance(a[1], dict):
        assert a[1].keys() == b[1].keys(), what
        for k in a[1]:
            np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=f"{what}: {k}")
    else:
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]), err_msg=what)


@pytest.mark.parametrize("isa", VECTOR)
@pytest.mark.parametrize("name", ALL_FORMATS)
@pytest.mark.parametrize("rounding", list(R.ROUNDINGS))
def test_formats_and_roundings(isa, name, rounding):
    x = _data(1, (24, 1024 + 64))
    base = {"rounding": rounding, "seed": 2024}
    cases = [{}, {"granularity": "tensor"}, {"granularity": "channel", "axis": 1},
             {"granularity": "group", "group_size": 68}, {"granularity": "group", "group_size": 3},
             {"granularity": "tensor", "scale": 0.25}]
    if name in INT_FORMATS:
        cases += [{"symmetric": False, "granularity": "group", "group_size": 17}]
    for kw in cases:
        _compare(isa, f"{name} {base} {kw}", _q, x, name, **base, **kw)


@pytest.mark.parametrize("isa", VECTOR)
@pytest.mark.parametrize("quantizer", ["midrise", "deadzone"])
@pytest.mark.parametrize("rounding", list(R.ROUNDINGS))
@pytest.mark.parametrize("name", ["int2", "int4", "int8", "uint4", "uint8"])
def test_quantizer_shapes(isa, quantizer, rounding, name):
    x = _data(2, (33, 777))
    for w in (1.0, 1.5, 2.5):
        for kw in ({}, {"granularity": "group", "group_size": 7}, {"scale": 0.125}):
            _compare(isa, f"{name} {quantizer} {rounding} w={w} {kw}", _q, x, name,
                     quantizer=quantizer, deadzone=w, rounding=rounding, seed=5, **kw)


@pytest.mark.parametrize("isa", VECTOR)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 32, 33, 255, 4097])
def test_odd_lengths_tails(isa, n):
    x = _data(3, (n,))
    for name in ("int4", "uint8", "nf4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "binary"):
        _compare(isa, f"{name} n={n}", _q, x, name, granularity="tensor")
        _compare(isa, f"{name} n={n} sr", _q, x, name, granularity="tensor", rounding="stochastic",
                 seed=n)


@pytest.mark.parametrize("isa", VECTOR)
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_paths(isa, bits):
    codes = torch.from_numpy(np.random.default_rng(bits).integers(0, 256, 10007).astype(np.uint8))
    for order in ("lsb", "msb"):
        _compare(isa, f"pack {bits} {order}", qkern.pack_bits, codes, bits, order=order)
        packed = qkern.pack_bits(codes, bits, order=order)
        _compare(isa, f"unpack {bits} {order}", qkern.unpack_bits, packed, bits, 10007, order=order)


@pytest.mark.parametrize("isa", VECTOR)
def test_companding_paths(isa):
    pcm = torch.arange(-32768, 32768, dtype=torch.int16)
    codes = torch.arange(256, dtype=torch.uint8)
    c = qkern.companding
    for enc, dec in ((c.mulaw_encode, c.mulaw_decode), (c.alaw_encode, c.alaw_decode)):
        _compare(isa, f"{enc.__name__}", enc, pcm)
        _compare(isa, f"{dec.__name__}", dec, codes)


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("name", ["int4", "uint8", "nf4", "fp8_e4m3", "mxfp4", "mxint8"])
def test_each_path_matches_reference(isa, name):
    """Every path against the numpy reference (not only against each other)."""
    isas.use(isa)
    x = _data(4, (16, 512))
    for rounding in ("nearest_even", "stochastic"):
        qt = qkern.quantize(x, name, rounding=rounding, seed=3)
        if name in ("int4", "uint8", "mxint8"):
            codes = R.quantize_int(np_f32(x), name, rounding=rounding, seed=3,
                                   **({"granularity": "group", "group_size": 32}
                                      if name == "mxint8" else {}))[0]
        else:
            codes = R.quantize_codebook(np_f32(x), name, rounding=rounding, seed=3)[0]
        np.testing.assert_array_equal(np_codes(qt), codes, err_msg=f"{isa} {name} {rounding}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_results(threads):
    x = _data(5, (256, 1024))
    ref = None
    for t in (1, threads):
        qkern.set_num_threads(t)
        assert qkern.get_num_threads() == t
        got = [_summ(qkern.quantize(x, n, rounding="stochastic", seed=9)) for n in
               ("int4", "nf4", "fp8_e5m2")]
        if ref is None:
            ref = got
        for a, b in zip(ref, got):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_force_scalar_env():
    code = "import qkern; print(qkern.get_isa())"
    env = dict(os.environ, QKERN_FORCE_SCALAR="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"


LEVELS = ("scalar", "avx2", "avx512", "amx")  # lowest first, as docs/architecture.md orders them


def highest_up_to(want: str) -> str:
    top = len(LEVELS) if want == "auto" else LEVELS.index(want) + 1
    return [i for i in LEVELS[:top] if i in isas.HAVE][-1]


@pytest.mark.parametrize("want", LEVELS + ("auto",))
def test_isa_env_and_set_isa_pick_the_highest_level_up_to_the_one_asked(want):
    """QKERN_ISA=<level> starts the process on that level, or on the highest one below it that
    this CPU has; qkern.set_isa(<level>) switches the same way."""
    code = "import qkern; print(qkern.get_isa())"
    env = {k: v for k, v in os.environ.items() if k != "QKERN_FORCE_SCALAR"}
    env["QKERN_ISA"] = want
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == highest_up_to(want)
    qkern.set_isa(want)  # conftest restores the level
    assert qkern.get_isa() == highest_up_to(want)


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="'scalar', 'avx2', 'avx512', 'amx' or 'auto'.*'sse4'"):
        qkern.set_isa("sse4")


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_seen_at_every_position(isa, bad):
    """A NaN/Inf anywhere (vector body, masked tail, any group) is reported on every path."""
    isas.use(isa)
    n = 67
    for pos in (0, 15, 16, 31, 63, 64, 66):
        x = torch.linspace(-1, 1, n)
        x[pos] = bad
        for kw in ({"granularity": "tensor"}, {"granularity": "group", "group_size": 67},
                   {"granularity": "tensor", "scale": 0.5}):
            for name in ("int4", "uint8", "nf4"):
                with pytest.raises(ValueError, match="NaN|Inf|finite"):
                    qkern.quantize(x, name, **kw)


@pytest.mark.parametrize("isa", VECTOR)
@pytest.mark.parametrize("threads", [1, 2])
def test_large_streamed_outputs(isa, threads):
    """Outputs of >= 4M floats take the streaming-store path: the same bits as the scalar
    kernels and the reference, on 1 and 2 threads."""
    qkern.set_num_threads(threads)
    x = _data(6, (1025, 4096))
    for name, kw in (("int4", {"granularity": "group", "group_size": 128}),
                     ("int8", {"granularity": "channel"}), ("nf4", {})):
        _compare(isa, f"{name} {kw} threads={threads}", _q, x, name, **kw)
    qt = qkern.quantize(x, "int4", granularity="group", group_size=128)
    _, _, _, deq = R.quantize_int(np_f32(x), "int4", granularity="group", group_size=128)
    np.testing.assert_array_equal(np_f32(qt.dequantize()).view(np.uint32), deq.view(np.uint32))
