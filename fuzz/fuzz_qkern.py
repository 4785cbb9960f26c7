"""Coverage-guided fuzzing (atheris / libFuzzer) of qkern's public API and raw torch ops.

Each input picks one target and drives it with values the fuzzer mutates: shapes (empty,
ragged), special floats, huge or negative sizes and ids, wrong dtypes, garbage files. A target
may raise the documented clean errors (ValueError, TypeError); anything else — another
exception, a crash, a hang, a sanitizer report — is a finding.

    make fuzz          # FUZZ_SECONDS (60) coverage-guided on the release build, then every
                       # input of the grown corpus replayed on the ASan + UBSan build
    python fuzz/fuzz_qkern.py DIR -max_total_time=60      # on the installed qkern
    python fuzz/fuzz_qkern.py crash-...                     # replay one input

Coverage guidance needs the release build: under gcc's ASan runtime (preloaded) libFuzzer
receives no coverage, so the sanitizer pass replays what the guided pass found.

The seed corpus (fuzz/corpus) holds one input per target, written by ``--write-seeds``.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings

import atheris

with atheris.instrument_imports(include=["qkern"]):
    import numpy as np
    import torch
    from torch import nn

    import qkern
    from qkern.nn import QuantLinear
    from qkern.ops.decode import attention_step, rms_norm, silu_mul
    from qkern.ops.vq import pack_codes
    from qkern.ops.vq8 import pack_codes4

CLEAN = (ValueError, TypeError)
OPS = torch.ops.qkern
FORMATS = qkern.formats.names()
SPECIALS = [0.0, -0.0, 1e-45, -1e-40, 1.0, -1.5, 2.5, 3e38, -3e38, 1e37, np.inf, -np.inf, np.nan]
BIG = [0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 64, 96, 128, 256, 512, 2**31 - 1, 2**31, 2**32,
       2**62, 2**63 - 1, -(2**63)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64]
TMP = tempfile.mkdtemp(prefix="qkern-fuzz-")
warnings.simplefilter("ignore")
qkern.set_num_threads(2)


def _int(fdp: atheris.FuzzedDataProvider, lo: int, hi: int) -> int:
    return fdp.ConsumeIntInRange(lo, hi)


def _size(fdp) -> int:  # mostly small, sometimes absurd
    return fdp.PickValueInList(BIG) if fdp.ConsumeBool() else _int(fdp, 0, 40)


def _floats(fdp, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    for i in range(n):
        out[i] = fdp.PickValueInList(SPECIALS) if _int(fdp, 0, 7) == 0 else \
            fdp.ConsumeFloatInRange(-1e4, 1e4)
    return out


def _tensor(fdp, shape) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    t = torch.from_numpy(_floats(fdp, n)).reshape(shape)
    dtype = fdp.PickValueInList(DTYPES) if _int(fdp, 0, 5) == 0 else torch.float32
    return t.to(dtype)


def target_quantize(fdp) -> None:
    shape = [_int(fdp, 0, 9) for _ in range(_int(fdp, 0, 3))]
    x = _tensor(fdp, shape)
    kw = {}
    if fdp.ConsumeBool():
        kw["granularity"] = fdp.PickValueInList(["tensor", "channel", "group", "rows"])
    if fdp.ConsumeBool():
        kw["axis"] = _int(fdp, -4, 3)
    if fdp.ConsumeBool():
        kw["group_size"] = fdp.PickValueInList([-1, 0, 1, 2, 3, 4, 8, 32, 64])
    if fdp.ConsumeBool():
        kw["rounding"] = fdp.PickValueInList(["nearest_even", "half_away", "half_up", "floor",
                                              "ceil", "trunc", "stochastic", "bogus"])
    if fdp.ConsumeBool():
        kw["symmetric"] = fdp.ConsumeBool()
    if fdp.ConsumeBool():
        kw["quantizer"] = fdp.PickValueInList(["midtread", "midrise", "deadzone", "x"])
        kw["deadzone"] = fdp.PickValueInList([0.5, 1.0, 1.5, 3.0, float("nan")])
    if fdp.ConsumeBool():
        kw["scale"] = fdp.PickValueInList(SPECIALS)
    if fdp.ConsumeBool():
        kw["clip_ratio"] = fdp.PickValueInList([0.5, 1.0, 0.0, -1.0, float("nan")])
    if fdp.ConsumeBool():
        kw["double_quant"] = True
    q = qkern.quantize(x, fdp.PickValueInList(FORMATS), **kw)
    q.dequantize()
    q.pack().unpack()


def target_bits(fdp) -> None:
    bits = _int(fdp, -1, 10)
    raw = fdp.ConsumeBytes(_int(fdp, 0, 64))
    buf = np.frombuffer(raw, np.uint8).copy()
    if fdp.ConsumeBool():
        codes = qkern.unpack_bits(buf, bits, n=_size(fdp), order=fdp.PickValueInList(
            ["lsb", "msb", "x"]))
        qkern.pack_bits(np.asarray(codes), bits)
    else:
        qkern.pack_int32(torch.from_numpy(buf.astype(np.int64)).reshape(-1, 1) % 16, bits=bits,
                         dim=_int(fdp, -2, 2))


def target_raw_quantize(fdp) -> None:
    n = _int(fdp, 0, 64)
    x = _tensor(fdp, [n])
    scale = torch.from_numpy(_floats(fdp, _int(fdp, 0, 4)))
    zp = None if fdp.ConsumeBool() else torch.tensor(
        [fdp.PickValueInList(BIG) for _ in range(scale.numel())], dtype=torch.int64).to(
        fdp.PickValueInList([torch.int32, torch.int64]))
    args = (_size(fdp), _int(fdp, -300, 300), _int(fdp, -300, 300), _int(fdp, -2, 9),
            _int(fdp, -2, 4), fdp.PickValueInList(SPECIALS), fdp.PickValueInList(BIG))
    codes = OPS.quantize_affine(x, scale, zp, *args)
    OPS.dequantize_affine(codes, scale, zp, args[0], fdp.ConsumeBool(),
                          fdp.PickValueInList([0.0, 0.5, float("nan")]))


def target_fake_quant(fdp) -> None:
    """qkern::lsq_fake_quantize forward and backward (ops/fake_quant.py)."""
    shape = [_int(fdp, 0, 9) for _ in range(_int(fdp, 0, 3))]
    x = _tensor(fdp, shape)
    c = _int(fdp, 0, 10)
    scale = torch.from_numpy(_floats(fdp, c))
    scale = scale.reshape(()) if c == 1 and fdp.ConsumeBool() else scale
    offset = None if fdp.ConsumeBool() else torch.from_numpy(_floats(fdp, scale.numel()))
    if offset is not None and fdp.ConsumeBool():
        offset = offset.reshape(scale.shape)
    ints = [-1, 0, 1, 7, 8, 127, 128, 2**31 - 1, 2**31]
    args = (None if fdp.ConsumeBool() else _int(fdp, -4, 3), fdp.PickValueInList(ints),
            fdp.PickValueInList(ints), fdp.PickValueInList([0.0, 0.1, np.inf, np.nan]))
    if x.is_floating_point():
        x.requires_grad_()
    y = OPS.lsq_fake_quantize(x, scale.requires_grad_(), offset, *args)
    y.backward(torch.ones_like(y))


def target_matmul(fdp) -> None:
    fmt = fdp.PickValueInList(["int4", "int3", "int2", "uint3", "nf4", "fp4_e2m1", "fp8_e4m3",
                               "int8", "binary", "ternary", "int5", "mxfp4"])
    n, k = _int(fdp, 1, 24), fdp.PickValueInList([8, 16, 32, 48, 64, 96, 128, 256])
    lin = nn.Linear(k, n, bias=fdp.ConsumeBool())
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(_floats(fdp, n * k)).reshape(n, k))
    kw = {"group_size": fdp.PickValueInList([None, 8, 16, 32, 64, 96, 128, 256]),
          "symmetric": fdp.ConsumeBool(),
          "act": fdp.PickValueInList(["none", "none", "int8_dynamic", "int8_dynamic_tensor",
                                      "binary"]),
          "mode": fdp.PickValueInList(["exact", "fast"])}
    q = QuantLinear.from_float(lin, fmt, **kw)
    x = _tensor(fdp, [_int(fdp, 0, 5), k])
    q(x)
    q.dequantize_weight()


def target_vq(fdp) -> None:
    """qkern::gemm_vq on raw operands: codes possibly out of range, odd group sizes, scales."""
    n, nv, dim = _int(fdp, 0, 40), _int(fdp, 0, 12), _int(fdp, 1, 9)
    kc = fdp.PickValueInList([1, 3, 16, 32, 33, 256, 300])
    gr = _int(fdp, 1, 48)
    wide = kc > 256 or fdp.ConsumeBool()
    hi = 65536 if wide else 256
    codes = torch.from_numpy(np.array([_int(fdp, 0, min(hi - 1, kc + 2)) for _ in range(n * nv)],
                                      dtype=np.int64)).reshape(n, nv)
    codes = codes.to(torch.uint16 if wide else torch.uint8)
    books = _tensor(fdp, [_int(fdp, 0, 4), kc, dim])
    scales = _tensor(fdp, [n, _int(fdp, 1, 4)]) if fdp.ConsumeBool() else None
    x = _tensor(fdp, [_int(fdp, 0, 5), nv * dim])
    OPS.gemm_vq(x, pack_codes(codes), books, scales, None, n, nv * dim, gr)
    OPS.dequantize_vq(pack_codes(codes), books, scales, n, nv * dim, gr)


def target_vq8(fdp) -> None:
    """qkern::gemm_vq8 on raw operands: any shape (supported or not), codes possibly out of
    range, either code layout (possibly the wrong one), int8 codebooks including -128."""
    n, dim = _int(fdp, 0, 40), fdp.PickValueInList([1, 2, 4, 8])
    nv = 4 * _int(fdp, 0, 6)
    kc = fdp.PickValueInList([1, 9, 16, 64, 100, 128, 256])
    gr = fdp.PickValueInList([1, 16, 32, max(n, 1)])
    codes = torch.from_numpy(np.array([_int(fdp, 0, min(255, kc + 2)) for _ in range(n * nv)],
                                      dtype=np.int64)).reshape(n, nv).to(torch.uint8)
    nib = fdp.ConsumeBool() and nv % 8 == 0
    packed = pack_codes4(codes % 16 if nib else codes, nibbles=nib)
    groups = _int(fdp, 0, 4)
    books8 = torch.from_numpy(np.array([_int(fdp, 0, 255) - 128 for _ in range(groups * kc * dim)],
                                       dtype=np.int64)).reshape(groups, kc, dim).to(torch.int8)
    bs = _tensor(fdp, [groups])
    scales = _tensor(fdp, [n, _int(fdp, 1, 4)]) if fdp.ConsumeBool() else None
    x = _tensor(fdp, [_int(fdp, 0, 5), nv * dim])
    OPS.gemm_vq8(x, packed, books8, bs, scales, None, n, nv * dim, gr)


def target_decode(fdp) -> None:
    """qkern.ops.decode: caches and heads of any (mismatched) layout, positions in and out of
    range, special floats, other dtypes, eps / scale of any value."""
    b, kvh, max_len = _int(fdp, 0, 3), _int(fdp, 0, 4), _int(fdp, 0, 9)
    d = fdp.PickValueInList([0, 1, 2, 3, 4, 8, 16, 34])
    heads = kvh * _int(fdp, 0, 3) + _int(fdp, 0, 1)
    q, k, v = (_tensor(fdp, [b, n, d]) for n in (heads, kvh, kvh))
    cos, sin = _tensor(fdp, [_int(fdp, 0, 1) + d - 1 if d else 0]), _tensor(fdp, [d])
    kc, vc = _tensor(fdp, [b, kvh, max_len, d]), _tensor(fdp, [b, kvh, max_len, d])
    pos = _size(fdp) * (-1 if fdp.ConsumeBool() else 1) if _int(fdp, 0, 3) == 0 else \
        _int(fdp, 0, max_len)
    scale = fdp.PickValueInList(SPECIALS) if fdp.ConsumeBool() else None
    attention_step(q, k, v, cos, sin, kc, vc, pos, scale)
    n, rows = _int(fdp, 0, 40), _int(fdp, 0, 3)
    x, w = _tensor(fdp, [rows, n]), _tensor(fdp, [n if fdp.ConsumeBool() else _int(fdp, 0, 40)])
    res = _tensor(fdp, [rows, n]) if fdp.ConsumeBool() else None
    rms_norm(x, w, float(fdp.PickValueInList(SPECIALS)), res)
    silu_mul(_tensor(fdp, [n]), _tensor(fdp, [n if fdp.ConsumeBool() else _int(fdp, 0, 40)]))


def target_load(fdp) -> None:
    path = os.path.join(TMP, "m.safetensors")
    data = fdp.ConsumeBytes(_int(fdp, 0, 4096))
    if fdp.ConsumeBool():  # a real file with some bytes overwritten: deeper than random bytes
        base = io.BytesIO(_SAVED)
        base.seek(_int(fdp, 0, len(_SAVED)))
        base.write(data)
        data = base.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    qkern.load(path, _model())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))


def _saved_bytes() -> bytes:
    path = os.path.join(TMP, "seed.safetensors")
    q = qkern.quantize_model(_model(), qkern.WeightOnlyConfig(fmt="int4", group_size=32))
    qkern.save(q, path)
    with open(path, "rb") as f:
        return f.read()


_SAVED = _saved_bytes()
TARGETS = [target_quantize, target_bits, target_raw_quantize, target_matmul, target_load,
           target_fake_quant, target_vq, target_vq8, target_decode]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)]
    try:
        target(fdp)
    except CLEAN:
        pass


def write_seeds(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, t in enumerate(TARGETS):
        with open(os.path.join(folder, f"seed-{t.__name__}"), "wb") as f:
            f.write(bytes([i]) + rng.integers(0, 256, 512, dtype=np.uint8).tobytes())


if __name__ == "__main__":
    if "--write-seeds" in sys.argv:
        write_seeds(sys.argv[-1])
        sys.exit(0)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
