"""qkern.kv.QuantizedKVCache: KIVI-style keys per channel / values per token, checked against
a numpy reference written from docs/numerics.md's affine and FP8 definitions (the FP8 codes
through torch's own float8_e4m3fn conversion), the float window, generate with the cache
against generate with transformers' DynamicCache, the memory it reports, and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import qkern
from qkern.models import load_pretrained
from qkern.models.assets import shipped_path

F32 = np.float32
QRANGE = {4: (-8, 7), 8: (-128, 127)}
KINDS = [(8, "int", False), (8, "int", True), (4, "int", False), (4, "int", True),
         (8, "fp8", True)]


def ref_groups(x: np.ndarray, bits: int, fmt: str, symmetric: bool):
    """Dequantized values and codes of groups along the LAST axis of ``x`` (..., g), from the
    definitions: int asymmetric lo = min(x, 0), hi = max(x, 0), s = (hi - lo) / (qmax - qmin),
    z = clamp(qmin - rne(lo / s)); symmetric s = amax / qmax, z = 0; q = clamp(rne(x * (1/s))
    + z), x_hat = (q - z) * s. FP8 E4M3: s = amax / 448, code = float8_e4m3fn(x * (1/s)) (IEEE
    round to nearest even), x_hat = float(code) * s. Zero scales become 1 (all-zero groups)."""
    x = x.astype(F32)
    if fmt == "fp8":
        s = (np.abs(x).max(-1, keepdims=True) / F32(448)).astype(F32)
        s[s == 0] = 1
        t = (x * (F32(1) / s)).astype(F32)
        codes = torch.from_numpy(t).to(torch.float8_e4m3fn)
        return (codes.float().numpy() * s).astype(F32), codes
    qmin, qmax = QRANGE[bits]
    if symmetric:
        s = (np.abs(x).max(-1, keepdims=True) / F32(qmax)).astype(F32)
        z = np.zeros_like(s)
    else:
        lo = np.minimum(x.min(-1, keepdims=True), F32(0))
        hi = np.maximum(x.max(-1, keepdims=True), F32(0))
        s = ((hi - lo) / F32(qmax - qmin)).astype(F32)
        s[s == 0] = 1
        z = np.clip(qmin - np.rint((lo / s).astype(F32)), qmin, qmax)
    s[s == 0] = 1
    q = np.clip(np.rint((x * (F32(1) / s)).astype(F32)) + z, qmin, qmax)
    return ((q - z).astype(F32) * s).astype(F32), q.astype(np.int64)


def ref_keys(k: np.ndarray, g: int, *kind):
    """Keys (B, H, T, D): per channel, groups of g consecutive tokens."""
    b, h, t, d = k.shape
    grouped = k.reshape(b, h, t // g, g, d).transpose(0, 1, 2, 4, 3)  # (..., T/g, D, g)
    deq, _ = ref_groups(grouped, *kind)
    return deq.transpose(0, 1, 2, 4, 3).reshape(b, h, t, d)


def ref_values(v: np.ndarray, g: int, *kind):
    """Values (B, H, T, D): per token, groups of g consecutive channels."""
    b, h, t, d = v.shape
    deq, codes = ref_groups(v.reshape(b, h, t, d // g, g), *kind)
    return deq.reshape(b, h, t, d), codes


def states(seed: int, b=2, h=3, t=64, d=16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g) * (1 + torch.arange(d))  # channel outliers
    v = torch.randn(b, h, t, d, generator=g)
    v[0, 0, 3] = 0.0  # an all-zero token: its value groups take scale 1
    return k, v


@pytest.mark.parametrize("bits,fmt,symmetric", KINDS)
def test_stored_states_match_the_numpy_reference(bits, fmt, symmetric):
    k, v = states(bits + symmetric)
    cache = qkern.kv.QuantizedKVCache(bits=bits, fmt=fmt, group_size=16, residual=0,
                                      symmetric=symmetric, value_group_size=8)
    for start in range(0, 64, 16):  # one flush per call: the chunks land at token 0, 16, ...
        cache.update(k[:, :, start:start + 16], v[:, :, start:start + 16], 0)
    layer = cache.layers[0]
    assert layer.qkeys.length == 64 and layer.keys.shape[2] == 0
    kind = (bits, fmt, symmetric)
    np.testing.assert_array_equal(layer.qkeys.dequantize(torch.float32).numpy(),
                                  ref_keys(k.numpy(), 16, *kind))
    want_v, codes = ref_values(v.numpy(), 8, *kind)
    np.testing.assert_array_equal(layer.qvalues.dequantize(torch.float32).numpy(), want_v)
    held = layer.qvalues.codes
    if fmt == "fp8":  # held as torch's float8_e4m3fn: codes * scale is the value
        assert held.dtype == torch.float8_e4m3fn
        assert torch.equal(held.view(torch.uint8), codes.reshape(held.shape).view(torch.uint8))
    elif bits == 4:  # two codes per byte: low nibble channel 2j, high nibble channel 2j + 1
        assert held.dtype == torch.uint8 and held.shape == (2, 3, 64, 8)
        c = codes.reshape(2, 3, 64, 16) & 0xF
        np.testing.assert_array_equal(held.numpy(), c[..., 0::2] | (c[..., 1::2] << 4))
    else:
        assert held.dtype == torch.int8
        np.testing.assert_array_equal(held.numpy(), codes.reshape(held.shape))


@pytest.mark.parametrize("residual,group", [(0, 16), (8, 16), (20, 8)])
def test_residual_window_stays_exact(residual, group):
    k, v = states(7, t=100)
    cache = qkern.kv.QuantizedKVCache(bits=4, group_size=group, residual=residual)
    seen = 0
    for n in (13, 1, 1, 30, 5, 50):  # uneven chunks
        out_k, out_v = cache.update(k[:, :, seen:seen + n], v[:, :, seen:seen + n], 0)
        layer = cache.layers[0]
        q = layer.qkeys.length
        # what attention saw: the past as held, then the new states exactly
        assert out_k.shape[2] == seen + n
        assert torch.equal(out_k[:, :, seen:], k[:, :, seen:seen + n])
        assert torch.equal(out_v[:, :, seen:], v[:, :, seen:seen + n])
        seen += n
        assert q % group == 0 and cache.get_seq_length() == seen
        w = seen - q
        assert (w < residual + group) and (w >= residual or q == 0)
        assert torch.equal(layer.keys, k[:, :, q:seen]) and torch.equal(layer.values,
                                                                          v[:, :, q:seen])
    np.testing.assert_array_equal(cache.layers[0].qkeys.dequantize(torch.float32).numpy(),
                                  ref_keys(k[:, :, :q].numpy(), group, 4, "int", False))


def test_nbytes_counts_the_tensors_held():
    k, v = states(3, b=2, h=3, t=70, d=16)  # 64 quantized + 6 in the window (group 16, r 0)
    sizes = {}
    for bits in (8, 4):
        cache = qkern.kv.QuantizedKVCache(bits=bits, group_size=16, residual=0,
                                          value_group_size=8)
        cache.update(k, v, 0)
        cache.update(k, v, 1)
        sizes[bits] = m = cache.memory()
        n_codes = 2 * 3 * 64 * 16  # per layer, keys (values the same)
        assert m["codes"] == 2 * 2 * n_codes * bits // 8
        n_scales = 2 * 3 * 64 // 16 * 16 + 2 * 3 * 64 * 16 // 8  # keys + values, per layer
        assert m["scales"] == 2 * 4 * n_scales and m["zero_points"] == 2 * n_scales
        assert m["window"] == 2 * 2 * (2 * 3 * 6 * 16) * 4
        assert cache.nbytes() == sum(m.values())
        assert cache.bytes_per_token() == cache.nbytes() / (70 * 2)
    assert sizes[4]["codes"] * 2 == sizes[8]["codes"]
    sym = qkern.kv.QuantizedKVCache(bits=4, group_size=16, residual=0, symmetric=True)
    sym.update(k, v, 0)
    assert sym.memory()["zero_points"] == 0


@pytest.fixture(scope="module")
def bytelm():
    return load_pretrained(shipped_path("models/wikitext-bytelm")).eval()


def test_generate_int8_matches_dynamic_cache(bytelm):
    """Greedy bytes identical to DynamicCache's for int8 (group 32, no float window: every
    full group quantized), on a 24-byte prompt, 64 new bytes; int4 runs too."""
    prompt = torch.tensor([list(b"The history of the city ")])
    kw = {"max_new_tokens": 64, "do_sample": False}
    with torch.no_grad():
        ref = bytelm.generate(prompt, past_key_values=DynamicCache(), **kw)
        cache = qkern.kv.QuantizedKVCache(bits=8, group_size=32, residual=0)
        got = bytelm.generate(prompt, past_key_values=cache, **kw)
        four = bytelm.generate(prompt, past_key_values=qkern.kv.QuantizedKVCache(bits=4), **kw)
    assert torch.equal(got, ref)
    assert cache.layers[0].qkeys.length == 64 and len(cache.layers) == 4
    assert four.shape == ref.shape


def test_forward_logits_through_the_cache(bytelm):
    """Chunked forwards through the int8 cache: logits within 0.05 of DynamicCache's; the fp32
    DynamicCache chunked path equals one plain forward within 1e-4."""
    text = b"Valkyria Chronicles III is a tactical role - playing video game developed by Sega"
    x = torch.tensor([list(text[:80])])
    with torch.no_grad():
        plain = bytelm(x).logits
        logits = {}
        for name, cache in (("fp32", DynamicCache()),
                            ("int8", qkern.kv.QuantizedKVCache(bits=8, group_size=16,
                                                               residual=0))):
            out = [bytelm(x[:, s:s + 16], past_key_values=cache).logits for s in range(0, 80, 16)]
            logits[name] = torch.cat(out, 1)
    assert (logits["fp32"] - plain).abs().max() < 1e-4
    err = (logits["int8"] - logits["fp32"]).abs().max()
    assert 0 < err < 0.05


def test_batch_select_is_exact():
    k, v = states(5, b=3, t=40)
    full = qkern.kv.QuantizedKVCache(bits=4, group_size=16, residual=4)
    one = qkern.kv.QuantizedKVCache(bits=4, group_size=16, residual=4)
    full.update(k, v, 0)
    one.update(k[2:3], v[2:3], 0)
    full.batch_select_indices(torch.tensor([2]))
    a, b = full.update(k[2:3, :, :1], v[2:3, :, :1], 0), one.update(k[2:3, :, :1],
                                                                   v[2:3, :, :1], 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 3}, "bits=3"),
    ({"bits": 4, "fmt": "fp8"}, "bits=4 with fmt='fp8'"),
    ({"fmt": "nf4"}, "fmt must be"),
    ({"group_size": 0}, "group_size must be >= 1"),
    ({"residual": -1}, "residual must be >= 0"),
    ({"value_group_size": 0}, "value_group_size must be >= 1"),
    ({"fmt": "fp8", "bits": 8, "symmetric": False}, "symmetric only"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qkern.kv.QuantizedKVCache(**kwargs)


def test_bad_types_and_shapes():
    with pytest.raises(TypeError, match="group_size must be an int"):
        qkern.kv.QuantizedKVCache(group_size=32.0)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        qkern.kv.QuantizedKVCache(symmetric=1)
    k, v = states(1, d=32)
    for kw in ({"group_size": 24}, {"value_group_size": 12}):  # 32 channels per head
        with pytest.raises(ValueError, match="does not divide the head dimension 32"):
            qkern.kv.QuantizedKVCache(**kw).update(k, v, 0)
    with pytest.raises(ValueError, match="must be even"):
        qkern.kv.QuantizedKVCache(bits=4, value_group_size=5).update(k[..., :15], v[..., :15], 0)
    with pytest.raises(ValueError, match="float"):
        qkern.kv.QuantizedKVCache().update(k.long(), v.long(), 0)
    cache = qkern.kv.QuantizedKVCache(group_size=16, residual=0)
    cache.update(k, v, 0)
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(-1)


def test_report_runs_on_two_windows():
    from qkern.tools.reports import kv_cache

    text = kv_cache.table(2, rows=["fp32 (DynamicCache)", "int4 g32 r0"])
    diff = float(text.split("chunked fp32 - plain: ")[1].split(")")[0])
    assert abs(diff) < 1e-5  # the DynamicCache chunked path reproduces the plain forward
    assert "| int4 g32 r0 |" in text and "| 8192 |" in text
