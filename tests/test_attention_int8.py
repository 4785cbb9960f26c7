"""Integer attention (qkern.nn.Int8Attention, QuantizedAttentionConfig) and the model-wide
LLM.int8 outlier report, against numpy references written from the definitions in
docs/attention.md (integer products in int64, e4m3 rounding from the format's grid)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import isas
import qkern
from qkern.models import bits_per_byte, load_llama, load_pretrained
from qkern.models.assets import shipped_path
from qkern.nn import Int8Attention
from qkern.nn.attention import int8_bmm
from qkern.quantization import LLMInt8Config, QuantizedAttentionConfig, outlier_report

BYTELM = "models/wikitext-bytelm"


def e4m3_grid() -> np.ndarray:
    """The e4m3 values in [0, 1] in code order: subnormals m 2^-9, then (1 + m/8) 2^(e-7)."""
    sub = [m * 2.0 ** -9 for m in range(8)]
    norm = [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 8) for m in range(8)]
    return np.array([v for v in sub + norm if v <= 1.0])


def round_e4m3(p: np.ndarray) -> np.ndarray:
    """Nearest e4m3 value, ties to the even code (p in [0, 1])."""
    g = e4m3_grid()
    i = np.clip(np.searchsorted(g, p), 1, len(g) - 1)
    lo, hi = g[i - 1], g[i]
    up = (p - lo > hi - p) | ((p - lo == hi - p) & (i % 2 == 0))
    return np.where(up, hi, lo)


def ref_attention(q, k, v, sq, sk, sv, scaling, keep, p_fmt):
    """numpy, from the definition: codes, int64 products, float32 softmax, quantized P."""
    q, k, v = (t.numpy().astype(np.float32) for t in (q, k, v))
    h = q.shape[1]
    sq = sq.numpy().reshape(1, h, 1, 1)
    sk = sk.numpy().reshape(1, h, 1, -1)
    sv = sv.numpy().reshape(1, h, 1, 1)
    per_channel = sk.shape[-1] > 1

    def code(x, s):
        return np.clip(np.round(x / s), -127, 127).astype(np.int64)

    qc = code(q * sk if per_channel else q, sq)
    kc, vc = code(k, sk), code(v, sv)
    acc = np.einsum("bhik,bhjk->bhij", qc, kc)
    step = (sq if per_channel else sq * sk) * np.float32(scaling)
    s = acc.astype(np.float32) * step.astype(np.float32)
    s = np.where(keep, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    p = (e / e.sum(-1, keepdims=True)).astype(np.float32)
    if p_fmt == "uint8":
        pc = np.clip(np.round(p * 255), 0, 255).astype(np.int64)
        return (pc @ vc).astype(np.float64) * (sv / 255.0), pc / 255.0
    pq = round_e4m3(p.astype(np.float64))
    return (pq @ vc) * sv, pq


@pytest.mark.parametrize("isa", isas.params())
def test_int8_bmm_exact(isa):
    isas.use(isa)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (3, 2, 7, 37), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (3, 2, 19, 37), generator=g, dtype=torch.int8)
    ref = np.einsum("...ik,...jk->...ij", a.numpy().astype(np.int64), b.numpy().astype(np.int64))
    assert np.array_equal(int8_bmm(a, b).numpy(), ref)


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("p_fmt", ["uint8", "fp8_e4m3"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_attention_matches_reference(isa, p_fmt, per_channel):
    isas.use(isa)
    g = torch.Generator().manual_seed(1)
    b, h, t, d = 2, 3, 24, 16
    q, k, v = (torch.randn(b, h, t, d, generator=g) * 2 for _ in range(3))
    sq = q.abs().amax((0, 2, 3)) / 127 * 0.8  # a little clipping: saturation is tested too
    sk = (k.abs().amax((0, 2)) if per_channel else k.abs().amax((0, 2, 3))[:, None]) / 127
    sv = v.abs().amax((0, 2, 3)) / 127
    if per_channel:
        sq = (q * sk[None, :, None, :]).abs().amax((0, 2, 3)) / 127
    keep = torch.ones(t, t, dtype=torch.bool).tril()
    att = Int8Attention(sq, sk, sv, p_fmt)
    out, p = att.attend(q, k, v, keep, d ** -0.5)
    ref_out, ref_p = ref_attention(q, k, v, sq, sk, sv, d ** -0.5, keep.numpy(), p_fmt)
    assert np.array_equal(p.numpy() == 0, ref_p == 0) or p_fmt == "fp8_e4m3"
    step = 1 / 255 if p_fmt == "uint8" else 1 / 16  # one P rounding step (e4m3: relative)
    flips = np.abs(p.numpy() - ref_p) > 1e-7
    assert flips.mean() < 1e-3  # only a float ulp of the softmax at a rounding tie can differ
    assert np.abs(p.numpy() - ref_p).max() <= step * 1.0001
    rows = flips.any(-1, keepdims=True)
    err = np.abs(out.numpy() - ref_out)
    assert err[~np.broadcast_to(rows, err.shape)].max() <= 1e-5 * np.abs(ref_out).max()
    assert err.max() <= 127 * sv.max().item() * step * 1.01 + 1e-5


def test_fully_masked_row_and_bad_input():
    att = Int8Attention(torch.ones(2) * 0.02, torch.ones(2) * 0.02, torch.ones(2) * 0.02)
    q = torch.randn(1, 2, 3, 4)
    keep = torch.tensor([[False, False, False], [True, False, False], [True, True, False]])
    out, p = att.attend(q, q, q, keep, 0.5)
    assert torch.all(out[:, :, 0] == 0) and torch.all(p[:, :, 0] == 0)
    with pytest.raises(ValueError, match="query"):
        att.attend(torch.randn(1, 3, 3, 4), q, q, None, 0.5)
    with pytest.raises(ValueError, match="p_fmt"):
        Int8Attention(torch.ones(2), torch.ones(2), torch.ones(2), "int4")
    with pytest.raises(ValueError, match="> 0"):
        Int8Attention(torch.zeros(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="int8"):
        int8_bmm(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="-127"):
        int8_bmm(torch.full((2, 3), -128, dtype=torch.int8), torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="p_fmt"):
        QuantizedAttentionConfig(p_fmt="int4")
    with pytest.raises(ValueError, match="calibration"):
        qkern.quantize_model(nn.Sequential(nn.Linear(2, 2)), QuantizedAttentionConfig())


def bytes_windows(split: str, n: int, offset: int = 0) -> torch.Tensor:
    data = shipped_path(f"data/wikitext-2/wiki.{split}.tokens").read_bytes()
    x = torch.frombuffer(bytearray(data[offset:offset + n * 128]), dtype=torch.uint8)
    return x.long().view(n, 128)


@pytest.fixture(scope="module")
def hf_pair():
    model = load_pretrained(shipped_path(BYTELM))
    cal = [bytes_windows("valid", 4)]
    q = qkern.quantize_model(model, QuantizedAttentionConfig(), calibration=cal)
    return model, q, cal


def test_calibrated_scales_are_amax(hf_pair):
    """Per-head scales = max |K| / 127 over the calibration data (K captured by a hook on the
    float model's k_proj, RoPE applied as transformers does)."""
    model, q, cal = hf_pair
    att = q.model.layers[0].self_attn.qat_attention
    assert isinstance(att, Int8Attention) and att.p_fmt == "uint8"
    cap = {}
    v_proj = model.model.layers[0].self_attn.v_proj
    h = v_proj.register_forward_hook(lambda m, a, o: cap.__setitem__("v", o))
    with torch.no_grad():
        model(cal[0])
    h.remove()
    heads, hd = 8, 32
    v = cap["v"].view(*cap["v"].shape[:2], heads, hd)
    ref = v.abs().amax((0, 1, 3)).numpy() / 127
    np.testing.assert_allclose(att.v_scale.numpy(), ref, rtol=1e-6)


def test_quality_and_both_hooks(hf_pair):
    """wikitext-bytelm: transformers (attention registry) and qkern's Llama (attn_fn) give the
    same int8 attention; bits per byte within 0.01 of float."""
    model, q, cal = hf_pair
    test = bytes_windows("test", 4)
    ql = qkern.quantize_model(load_llama(shipped_path(BYTELM)), QuantizedAttentionConfig(),
                              calibration=cal)
    with torch.no_grad():
        a, b = q(test).logits, ql(test)
    assert (a - b).abs().max() < 1e-3
    data = shipped_path("data/wikitext-2/wiki.test.tokens").read_bytes()
    f32 = bits_per_byte(load_llama(shipped_path(BYTELM)), data, 128, 8)
    i8 = bits_per_byte(ql, data, 128, 8)
    assert abs(i8 - f32) < 0.01 and i8 != f32


def test_kv_cache(hf_pair):
    """Decoding through a KV cache (transformers' DynamicCache, qkern.kv's cache) gives the
    logits of the one-shot forward: each query row only reads the cached K / V codes."""
    from transformers import DynamicCache

    from qkern.kv import QuantizedKVCache

    _, q, _ = hf_pair
    x = bytes_windows("test", 2)[:, :40]
    with torch.no_grad():
        full = q(x).logits
        cache = DynamicCache()
        parts = [q(x[:, :24], past_key_values=cache, use_cache=True).logits]
        for i in range(24, 40, 8):
            parts.append(q(x[:, i:i + 8], past_key_values=cache, use_cache=True).logits)
        assert (torch.cat(parts, 1) - full).abs().max() < 1e-3
        kv = QuantizedKVCache(bits=8, group_size=32, residual=0)
        out = [q(x[:, :24], past_key_values=kv, use_cache=True).logits]
        for i in range(24, 40, 8):  # the first 32 positions are flushed to int8 codes
            out.append(q(x[:, i:i + 8], past_key_values=kv, use_cache=True).logits)
    # int8 K / V in the cache then int8 codes again in attention: close, not equal
    err = (torch.cat(out, 1) - full).abs().max()
    assert 0 < err < 0.2


def test_outlier_report_matches_numpy():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.mul_(3)
    xs = [torch.randn(5, 16, generator=g) * 3 for _ in range(3)]
    r = outlier_report(model, xs, threshold=6.0)
    w1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    x = np.concatenate([t.numpy() for t in xs])
    hid = np.maximum(x @ w1.T + b1, 0)
    want = [int((np.abs(x) >= 6).any(0).sum()), int((np.abs(hid) >= 6).any(0).sum())]
    assert [row.channels for row in r.rows] == want and r.channels == sum(want)
    assert [row.layer for row in r.rows] == ["0", "2"] and 0 < want[0] < 16
    assert r.rows[0].per_call == np.mean([(np.abs(t.numpy()) >= 6).any(0).sum() for t in xs])
    with pytest.raises(ValueError, match="threshold"):
        outlier_report(model, xs, threshold=-1)
    # the converted LLM.int8 model sees the same inputs in its first layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qkern.quantize_model(model, LLMInt8Config(threshold=6.0))
    assert outlier_report(qm, xs, 6.0).rows[0].channels == want[0]
