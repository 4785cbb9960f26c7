"""CUDA kernels vs the CPU kernels, bit for bit: every torch.ops.qkern op on CUDA tensors must
give exactly the codes, scales, zero points and floats the CPU gives. Skipped without a CUDA
device or without qkern._cuda."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("qkern._cuda")
pytest.importorskip("qkern.ops.cuda")  # registers the CUDA kernels (qkern.ops does it too)

import qkern
from qkern import formats as F
from qkern.ops import NonFiniteError

OPS = torch.ops.qkern
DEV = torch.device("cuda")
ROUNDINGS = range(7)
SEEDS = (0x123456789ABCDEF, -0x5A5A5A5A5A5A5A5B)  # int64 carrying uint64 bits, high bit set too

# (n, group): warp-per-group, block-per-group and multi-block (group >= 65536) paths, tails
# that are no multiple of 4, one-element groups.
LAYOUTS = [(4096, 32), (3 * 1000, 1000), (5 * 4099, 4099), (12, 3), (7, 1), (2 * 70001, 70001)]
SMALL_LAYOUTS = [(4096, 32), (3 * 1000, 1000), (12, 3)]

# name: (qmin, qmax, rule, qpos, emax, shape, deadzone_half)
AFFINE = {
    "int8": (-128, 127, 0, 127.0, 0, 0, 0.0),
    "uint4_asym": (0, 15, 1, 15.0, 0, 0, 0.0),
    "int8_asym": (-128, 127, 1, 255.0, 0, 0, 0.0),
    "int4_midrise": (-8, 7, 0, 7.5, 0, 1, 0.0),
    "int4_deadzone": (-8, 7, 0, 7.0, 0, 2, 0.25),
    "ternary": (-1, 1, 0, 1.0, 0, 0, 0.0),
    "mxint8": (-128, 127, 2, 127.0, 6, 0, 0.0),
    "int2_meanabs": (-2, 1, 3, 1.0, 0, 0, 0.0),
    "uint8_sym": (0, 255, 0, 255.0, 0, 0, 0.0),
}
CODEBOOKS = [n for n in F.names() if F.get(n).kind == "codebook"]


def _data(n: int, group: int, seed: int = 0) -> torch.Tensor:
    """Normal data with outliers, exact halves/quarters (rounding ties), -0.0, subnormals and
    an all-zero group (degenerate scale) when there are several groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    x[::37] *= 50
    x[1::11] = torch.randint(-64, 65, (len(range(1, n, 11)),), generator=g).float() / 4
    x[2::53] = -0.0
    x[3::97] = 1e-40
    if n // group > 2:
        x[group: 2 * group] = 0.0
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same(got: torch.Tensor, ref: torch.Tensor, what: str, on_cuda: bool = True) -> None:
    assert got.device.type == "cuda" or not on_cuda, what
    assert got.dtype == ref.dtype and got.shape == ref.shape, (what, got.dtype, ref.dtype,
                                                               got.shape, ref.shape)
    a, b = _bits(got), _bits(ref)
    bad = a != b
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ, first at flat "
                             f"{i}: cuda {got.reshape(-1)[i].item()!r} vs cpu "
                             f"{ref.reshape(-1)[i].item()!r}")


def _cuda(t):
    return None if t is None else t.to(DEV)


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """The same values on the GPU at an address that is no multiple of 16 bytes."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEV)
    buf[1:] = x.reshape(-1).to(DEV)
    return buf[1:].view(x.shape)


# ------------------------------------------------------------------------------------ affine
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(AFFINE))
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_affine_dynamic(layout, name, rounding):
    n, group = layout
    qmin, qmax, rule, qpos, emax, shape, dzh = AFFINE[name]
    x = _data(n, group, seed=rounding).view(n // group, group)
    for seed in SEEDS if rounding == 6 else SEEDS[:1]:
        args = (group, qmin, qmax, rule, qpos, emax, rounding, shape, dzh, seed)
        c_ref, s_ref, z_ref = OPS.quantize_affine_dynamic(x, *args)
        c, s, z = OPS.quantize_affine_dynamic(_cuda(x), *args)
        _same(s, s_ref, f"{name} scale")
        _same(z, z_ref, f"{name} zero point")
        _same(c, c_ref, f"{name} codes")
        zp_ref = z_ref if rule == 1 else None
        offset = 0.5 if shape == 1 else 0.0
        deq = (group, qmin < 0, offset)
        _same(OPS.dequantize_affine(c, s, _cuda(zp_ref), *deq),
              OPS.dequantize_affine(c_ref, s_ref, zp_ref, *deq), f"{name} dequantized")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["int8", "uint4_asym", "int4_midrise", "int4_deadzone"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("aligned", [True, False])
def test_affine_static(layout, name, rounding, aligned):
    n, group = layout
    qmin, qmax, rule, _, _, shape, dzh = AFFINE[name]
    x = _data(n, group, seed=7 + rounding)
    g = torch.Generator().manual_seed(rounding)
    # power-of-two scales: the quarters in the data become exact ties; small ones saturate
    scale = torch.pow(2.0, torch.randint(-4, 3, (n // group,), generator=g).float())
    zp = torch.randint(qmin, qmax + 1, (n // group,), generator=g, dtype=torch.int32)
    zp = zp if rule == 1 else None
    xc = _cuda(x) if aligned else _misaligned(x)
    for seed in SEEDS if rounding == 6 else SEEDS[:1]:
        args = (group, qmin, qmax, rounding, shape, dzh, seed)
        ref = OPS.quantize_affine(x, scale, zp, *args)
        _same(OPS.quantize_affine(xc, _cuda(scale), _cuda(zp), *args), ref, f"{name} codes")


@pytest.mark.parametrize("layout", SMALL_LAYOUTS + [(2 * 70001, 70001)])
@pytest.mark.parametrize("is_signed", [True, False])
@pytest.mark.parametrize("with_zp", [True, False])
@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_dequantize_affine(layout, is_signed, with_zp, offset):
    n, group = layout
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 256, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    scale = torch.rand(n // group, generator=g) * 0.1 + 1e-3
    scale[0] = 1e-42  # subnormal scale
    zp = torch.randint(-128, 128, (n // group,), generator=g, dtype=torch.int32) if with_zp \
        else None
    args = (group, is_signed, offset)
    ref = OPS.dequantize_affine(codes, scale, zp, *args)
    _same(OPS.dequantize_affine(_cuda(codes), _cuda(scale), _cuda(zp), *args), ref, "aligned")
    got = OPS.dequantize_affine(_misaligned(codes), _cuda(scale), _cuda(zp), *args)
    _same(got, ref, "misaligned codes")


# ---------------------------------------------------------------------------------- codebook
def _table(fmt):
    vals, cods = fmt.search_table
    return torch.from_numpy(vals), torch.from_numpy(cods)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_codebook_dynamic(layout, name, rounding):
    n, group = layout
    fmt = F.get(name)
    vals, cods = _table(fmt)
    x = _data(n, group, seed=100 + rounding).view(n // group, group)
    for tables_on_gpu in (True, False):
        v, c = (_cuda(vals), _cuda(cods)) if tables_on_gpu else (vals, cods)
        for seed in SEEDS if rounding == 6 else SEEDS[:1]:
            args = (fmt.sign_bit, group, fmt.scale_rule, fmt.max_value, fmt.emax, rounding, seed)
            c_ref, s_ref = OPS.quantize_codebook_dynamic(x, vals, cods, *args)
            cg, sg = OPS.quantize_codebook_dynamic(_cuda(x), v, c, *args)
            _same(sg, s_ref, f"{name} scale")
            _same(cg, c_ref, f"{name} codes")
            lut = torch.from_numpy(fmt.lut)
            _same(OPS.dequantize_lut(cg, sg, _cuda(lut), group),
                  OPS.dequantize_lut(c_ref, s_ref, lut, group), f"{name} dequantized")


@pytest.mark.parametrize("layout", SMALL_LAYOUTS + [(2 * 70001, 70001)])
@pytest.mark.parametrize("name", ["nf4", "fp4_e2m1", "fp8_e4m3", "log2_4", "binary"])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("aligned", [True, False])
def test_codebook_static(layout, name, rounding, aligned):
    n, group = layout
    fmt = F.get(name)
    vals, cods = _table(fmt)
    x = _data(n, group, seed=200 + rounding)
    g = torch.Generator().manual_seed(rounding)
    scale = torch.pow(2.0, torch.randint(-3, 4, (n // group,), generator=g).float())
    xc = _cuda(x) if aligned else _misaligned(x)
    for seed in SEEDS if rounding == 6 else SEEDS[:1]:
        args = (fmt.sign_bit, group, rounding, seed)
        ref = OPS.quantize_codebook(x, scale, vals, cods, *args)
        got = OPS.quantize_codebook(xc, _cuda(scale), _cuda(vals), _cuda(cods), *args)
        _same(got, ref, f"{name} codes")


@pytest.mark.parametrize("layout", SMALL_LAYOUTS + [(2 * 70001, 70001)])
def test_dequantize_lut(layout):
    n, group = layout
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    scale = torch.rand(n // group, generator=g) + 0.5
    lut = torch.randn(256, generator=g)
    ref = OPS.dequantize_lut(codes, scale, lut, group)
    _same(OPS.dequantize_lut(_cuda(codes), _cuda(scale), _cuda(lut), group), ref, "lut")
    _same(OPS.dequantize_lut(_misaligned(codes), _cuda(scale), lut, group), ref, "misaligned")


# ------------------------------------------------------------------ big groups, mean|x|, streams
@pytest.mark.parametrize("n", [1 << 18, (1 << 18) + 3])
def test_single_big_group(n):
    x = _data(n, n, seed=5)
    for name in ("int8", "uint4_asym", "int2_meanabs", "mxint8"):
        qmin, qmax, rule, qpos, emax, shape, dzh = AFFINE[name]
        args = (n, qmin, qmax, rule, qpos, emax, 0, shape, dzh, 0)
        ref = OPS.quantize_affine_dynamic(x, *args)
        got = OPS.quantize_affine_dynamic(_cuda(x), *args)
        for a, b, what in zip(got, ref, ("codes", "scale", "zp")):
            _same(a, b, f"{name} {what}")
    fmt = F.get("binary")
    vals, cods = _table(fmt)
    args = (fmt.sign_bit, n, fmt.scale_rule, fmt.max_value, fmt.emax, 0, 0)
    ref = OPS.quantize_codebook_dynamic(x, vals, cods, *args)
    got = OPS.quantize_codebook_dynamic(_misaligned(x), vals, cods, *args)
    _same(got[1], ref[1], "binary scale")
    _same(got[0], ref[0], "binary codes")


def test_side_stream():
    n, group = 1 << 16, 64
    x = _data(n, group)
    args = (group, -8, 7, 0, 7.0, 0, 6, 0, 0.0, 42)
    ref = OPS.quantize_affine_dynamic(x, *args)
    stream = torch.cuda.Stream()
    xc = _cuda(x)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = OPS.quantize_affine_dynamic(xc, *args)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(got, ref):
        _same(a, b, "side stream")


def test_empty():
    x = torch.empty(0)
    codes, scale, zp = OPS.quantize_affine_dynamic(_cuda(x), 32, -128, 127, 0, 127.0, 0, 0, 0,
                                                   0.0, 0)
    assert codes.numel() == 0 and scale.numel() == 0 and zp.numel() == 0
    assert OPS.pack_bits(_cuda(torch.empty(0, dtype=torch.uint8)), 3, False).numel() == 0


# --------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("layout", [(4096, 32), (3 * 2000, 2000), (2 * 70001, 70001)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_raises(layout, bad):
    n, group = layout
    x = _data(n, group)
    x[n - 5] = bad
    xc = _cuda(x)
    fmt = F.get("nf4")
    vals, cods = _table(fmt)
    calls = [
        lambda: OPS.quantize_affine_dynamic(xc, group, -128, 127, 0, 127.0, 0, 0, 0, 0.0, 0),
        lambda: OPS.quantize_affine_dynamic(xc, group, 0, 15, 1, 15.0, 0, 0, 0, 0.0, 0),
        lambda: OPS.quantize_affine(xc, torch.ones(n // group, device=DEV), None, group,
                                    -128, 127, 0, 0, 0.0, 0),
        lambda: OPS.quantize_codebook_dynamic(xc, vals, cods, 0, group, 0, 1.0, 0, 0, 0),
        lambda: OPS.quantize_codebook(xc, torch.ones(n // group, device=DEV), vals, cods, 0,
                                      group, 0, 0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="NaN or Inf") as info:
            call()
        assert isinstance(info.value, NonFiniteError)
    # and the flag is cleared again by the next call
    OPS.quantize_affine_dynamic(_cuda(_data(n, group)), group, -128, 127, 0, 127.0, 0, 0, 0,
                                0.0, 0)


def test_argument_errors():
    x = _cuda(torch.randn(100))
    with pytest.raises(ValueError, match="does not divide"):
        OPS.quantize_affine_dynamic(x, 33, -128, 127, 0, 127.0, 0, 0, 0, 0.0, 0)
    with pytest.raises(ValueError, match="scale"):
        OPS.quantize_affine(x, torch.ones(3, device=DEV), None, 50, -128, 127, 0, 0, 0.0, 0)
    with pytest.raises(ValueError, match="rounding"):
        OPS.quantize_affine(x, torch.ones(2, device=DEV), None, 50, -128, 127, 9, 0, 0.0, 0)
    with pytest.raises(ValueError, match="ascending"):
        OPS.quantize_codebook(x, torch.ones(2, device=DEV), torch.tensor([1.0, 0.0]),
                              torch.tensor([0, 1], dtype=torch.uint8), 0, 50, 0, 0)
    with pytest.raises(ValueError, match="bits"):
        OPS.pack_bits(_cuda(torch.zeros(8, dtype=torch.uint8)), 9, False)
    with pytest.raises(ValueError, match="too short"):
        OPS.unpack_bits(_cuda(torch.zeros(2, dtype=torch.uint8)), 3, 8, False)


# ------------------------------------------------------------------------------- bit packing
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("msb", [False, True])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001, 4096 + 3, 1 << 17])
def test_pack_unpack(bits, msb, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 256, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    ref = OPS.pack_bits(codes, bits, msb)
    got = OPS.pack_bits(_cuda(codes), bits, msb)
    _same(got, ref, "packed")
    _same(OPS.pack_bits(_misaligned(codes), bits, msb), ref, "packed, misaligned")
    back_ref = OPS.unpack_bits(ref, bits, n, msb)
    back = OPS.unpack_bits(got, bits, n, msb)
    _same(back, back_ref, "unpacked")
    assert torch.equal(back.cpu(), codes & ((1 << bits) - 1))


# ------------------------------------------------------------------------------------- G.711
@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_g711_exhaustive(law):
    pcm = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(256, 256)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    enc, dec = getattr(OPS, f"{law}_encode"), getattr(OPS, f"{law}_decode")
    _same(enc(_cuda(pcm)), enc(pcm), f"{law} encode")
    _same(dec(_cuda(codes)), dec(codes), f"{law} decode")
    _same(enc(_misaligned(pcm)), enc(pcm), f"{law} encode, misaligned")


# ----------------------------------------------------------------------- public API end to end
@pytest.mark.parametrize("name", [n for n in F.names() if F.get(n).kind != "companded"
                                  and n != "int1"])
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_quantize_public_api(name, rounding):
    x = _data(32 * 192, 192, seed=11).view(32, 192)  # 192: a multiple of every block size
    kw = {"rounding": rounding, "seed": 3 if rounding == "stochastic" else None}
    ref = qkern.quantize(x, name, **kw)
    got = qkern.quantize(_cuda(x), name, **kw)
    _same(got.codes, ref.codes, f"{name} codes")
    _same(got.scale, ref.scale, f"{name} scale", on_cuda=False)
    _same(qkern.dequantize(got), qkern.dequantize(ref), f"{name} dequantized", on_cuda=False)
    if F.get(name).kind == "int" and not F.get(name).symmetric_only:
        ref = qkern.quantize(x, name, symmetric=False, **kw)
        got = qkern.quantize(_cuda(x), name, symmetric=False, **kw)
        _same(got.codes, ref.codes, f"{name} asym codes")
        _same(got.zero_point, ref.zero_point, f"{name} asym zero point", on_cuda=False)
