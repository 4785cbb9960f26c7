"""qkern.ops.decode (csrc/cpu/decode) against float64 numpy written from the definitions
(RMSNorm, SiLU, rotate-half RoPE, softmax attention with grouped KV heads) on every ISA; the
RoPE'd keys written to the cache bit for bit as eager torch's ``k * cos + rotate_half(k) *
sin``; thread counts agreeing bit for bit; bad input refused; and qkern's Llama decoding
through them (the fused step) as through its modules, falling back where it must."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkern
from isas import params, use
from qkern import _C
from qkern.models import KVCache, Llama, LlamaConfig
from qkern.ops.decode import attention_step, rms_norm, silu_mul


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rope64(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., h:], x[..., :h]], -1) * sin


def _attn64(q, kc, vc, n, scale):
    """float64 softmax(scale q K^T) V over the first n positions; q (b, h, d) already RoPE'd,
    caches (b, kvh, L, d)."""
    b, h, d = q.shape
    rep = h // kc.shape[1]
    out = np.zeros((b, h, d))
    for i in range(b):
        for j in range(h):
            k, v = kc[i, j // rep, :n], vc[i, j // rep, :n]
            s = scale * (k @ q[i, j])
            p = np.exp(s - s.max())
            out[i, j] = (p / p.sum()) @ v
    return out


def _tables(d: int, pos: int):
    inv = 10000.0 ** (-np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv]).astype(np.float32)
    return torch.from_numpy(np.cos(ang)), torch.from_numpy(np.sin(ang))


@pytest.mark.parametrize("isa", params())
def test_rms_norm_matches_float64(isa):
    use(isa)
    g = _rng(1)
    for rows, n in ((1, 1), (3, 5), (2, 16), (1, 17), (4, 64), (1, 2048), (2, 2049)):
        x, r = torch.randn(rows, n, generator=g) * 3, torch.randn(rows, n, generator=g)
        w = torch.randn(n, generator=g)
        for res in (None, r):
            s = x.double().numpy() + (0 if res is None else res.double().numpy())
            want = w.double().numpy() * s / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-5)
            got = rms_norm(x, w, 1e-5) if res is None else rms_norm(x, w, 1e-5, residual=res)
            if res is not None:
                got, total = got
                assert torch.equal(total, x + res), (isa, n)  # float32 x + res, exactly
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=2e-6 * np.abs(
                want).max(), err_msg=f"{isa} rows={rows} n={n}")


@pytest.mark.parametrize("isa", params())
def test_silu_mul_matches_float64(isa):
    use(isa)
    g = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([0.0, -0.0, 88.0, -88.0,
                                                                  -90.0, 1e-30, -1e-30])])
    u = torch.randn(g.numel(), generator=_rng(2))
    got = silu_mul(g, u).double().numpy()
    g64, u64 = g.double().numpy(), u.double().numpy()
    want = g64 / (1 + np.exp(-g64)) * u64
    assert np.isfinite(got).all()
    # SiLU within ~2 ulp of float32 (expf-grade exp, one division, one product); below
    # g = -87 the true value (~1e-40) comes out as 0 (scalar, as torch) or ~1e-37 (clamped exp)
    np.testing.assert_allclose(got, want, rtol=4e-7, atol=1e-35, err_msg=isa)
    for n in (1, 7, 8, 15, 16, 33):  # tails below the vector width
        gs, us = g[:n] * 0.1, u[:n]
        torch.testing.assert_close(silu_mul(gs, us), torch.nn.functional.silu(gs) * us,
                                   rtol=4e-7, atol=1e-30)


CASES = [  # batch, heads, kv_heads, head_dim, max_len, pos
    (1, 1, 1, 2, 1, 0), (1, 16, 16, 128, 40, 37), (2, 8, 2, 64, 9, 8), (2, 6, 3, 6, 20, 5),
    (1, 4, 1, 34, 70, 69), (3, 2, 2, 32, 17, 0),
    (1, 7, 1, 16, 12, 11), (2, 10, 2, 24, 6, 5),  # 7 / 5 heads per KV head: groups 4 + 3, 4 + 1
]


@pytest.mark.parametrize("isa", params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}kv{}d{}L{}p{}".format(*c))
def test_attention_step_matches_float64(isa, case):
    use(isa)
    b, h, kvh, d, max_len, pos = case
    g = _rng(3)
    q, k, v = (torch.randn(b, n, d, generator=g) for n in (h, kvh, kvh))
    kc, vc = torch.randn(b, kvh, max_len, d, generator=g), torch.randn(b, kvh, max_len, d,
                                                                       generator=g)
    cos, sin = _tables(d, pos)
    kc0, vc0 = kc.clone(), vc.clone()
    y = attention_step(q.view(b, 1, h * d), k, v, cos, sin, kc, vc, pos)
    assert y.shape == (b, 1, h * d)
    # the cache: RoPE(k) as eager torch computes it, bit for bit; v as is; nothing else touched
    half = d // 2
    want_k = k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin
    assert torch.equal(kc[:, :, pos], want_k) and torch.equal(vc[:, :, pos], v)
    keep = torch.arange(max_len) != pos
    assert torch.equal(kc[:, :, keep], kc0[:, :, keep]) and torch.equal(vc[:, :, keep],
                                                                       vc0[:, :, keep])
    c64, s64 = cos.double().numpy(), sin.double().numpy()
    kc64 = kc0.double().numpy()
    kc64[:, :, pos] = _rope64(k.double().numpy(), c64, s64)
    vc64 = vc.double().numpy()
    want = _attn64(_rope64(q.double().numpy(), c64, s64), kc64, vc64, pos + 1, d ** -0.5)
    np.testing.assert_allclose(y.view(b, h, d).numpy(), want, rtol=1e-5, atol=2e-6,
                               err_msg=f"{isa} {case}")
    y2 = attention_step(q, k, v, cos, sin, kc0.clone(), vc0.clone(), pos, scale=0.25)
    want2 = _attn64(_rope64(q.double().numpy(), c64, s64), kc64, vc64, pos + 1, 0.25)
    np.testing.assert_allclose(y2.numpy(), want2, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("isa", params())
def test_threads_agree_bit_for_bit(isa):
    """16 heads of 128 over 700 positions: enough work for the pool; every head is one task,
    so results do not depend on the thread count."""
    use(isa)
    g = _rng(4)
    q, k, v = torch.randn(1, 16, 128, generator=g), *torch.randn(2, 1, 4, 128, generator=g)
    kc, vc = torch.randn(1, 4, 800, 128, generator=g), torch.randn(1, 4, 800, 128, generator=g)
    cos, sin = _tables(128, 699)
    x, w = torch.randn(64, 4096, generator=g), torch.rand(4096, generator=g)
    gate, up = torch.randn(300000, generator=g), torch.randn(300000, generator=g)
    outs = []
    for threads in (1, 2, 3):
        qkern.set_num_threads(threads)
        outs.append((attention_step(q, k, v, cos, sin, kc.clone(), vc.clone(), 699),
                     rms_norm(x, w, 1e-6), silu_mul(gate, up)))
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


def test_bad_input_is_refused():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="float32"):
        rms_norm(x.double(), w, 1e-5)
    with pytest.raises(ValueError, match="not contiguous"):
        rms_norm(torch.randn(8, 2).t(), w, 1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm(x, w, 1e-5, residual=torch.randn(1, 8))
    with pytest.raises(ValueError, match="requires grad"):
        rms_norm(x.requires_grad_(), w, 1e-5)
    with pytest.raises(TypeError, match="must be a tensor"):
        silu_mul([1.0], torch.ones(1))
    with pytest.raises(ValueError, match="gate shape"):
        silu_mul(torch.ones(3), torch.ones(4))
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    kc, vc = torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8)
    cos, sin = _tables(8, 0)
    for pos in (-1, 5):
        with pytest.raises(ValueError, match="outside the cache"):
            attention_step(q, k, v, cos, sin, kc, vc, pos)
    with pytest.raises(ValueError, match="q needs batch 1"):
        attention_step(torch.randn(1, 3, 8), k, v, cos, sin, kc, vc, 0)
    with pytest.raises(ValueError, match="a multiple of kv_heads 4"):  # 6 heads, 4 kv heads
        attention_step(torch.randn(1, 6, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), cos,
                       sin, torch.zeros(1, 4, 5, 8), torch.zeros(1, 4, 5, 8), 0)
    with pytest.raises(ValueError, match="even"):
        c3 = torch.zeros(1, 2, 5, 3)
        attention_step(torch.randn(1, 4, 3), torch.randn(1, 2, 3), torch.randn(1, 2, 3),
                       torch.ones(3), torch.ones(3), c3, c3.clone(), 0)
    with pytest.raises(ValueError, match="same memory"):
        attention_step(q, k, v, cos, sin, kc, kc, 0)
    with pytest.raises(TypeError, match="pos must be an integer"):
        attention_step(q, k, v, cos, sin, kc, vc, 1.5)
    with pytest.raises(ValueError, match="scale must be a finite"):
        attention_step(q, k, v, cos, sin, kc, vc, 0, scale=float("nan"))
    for eps in (-1e-5, float("inf"), "1e-5"):
        with pytest.raises(ValueError, match="eps must be"):
            rms_norm(x, w, eps)
    with pytest.raises(ValueError, match="alike"):
        attention_step(q, k, v, cos, sin, kc, torch.zeros(1, 2, 6, 8), 0)
    with pytest.raises(ValueError, match="cos and sin"):
        attention_step(q, k, v, cos[:4], sin, kc, vc, 0)
    assert torch.equal(kc, torch.zeros(1, 2, 5, 8))  # nothing written by a refused call


def test_raw_bindings_refuse_bad_sizes_and_pointers():
    """The ``*_raw`` bindings check again what they can: null pointers, sizes past 2^56, the
    head layout, the position (ops/decode.py checks the tensors first)."""
    x = torch.ones(4)
    with pytest.raises(ValueError, match="null pointer"):
        _C.rms_norm_raw(0, 0, x.data_ptr(), 1, 4, 1e-5, 0, x.data_ptr())
    with pytest.raises(ValueError, match="needs a sum output"):
        _C.rms_norm_raw(x.data_ptr(), x.data_ptr(), x.data_ptr(), 1, 4, 1e-5, 0, x.data_ptr())
    with pytest.raises(ValueError, match="exceeds 2"):
        _C.rms_norm_raw(x.data_ptr(), 0, x.data_ptr(), 1 << 40, 1 << 40, 1e-5, 0, x.data_ptr())
    with pytest.raises(ValueError, match="null pointer"):
        _C.silu_mul_raw(x.data_ptr(), 0, 4, x.data_ptr())
    with pytest.raises(ValueError, match="negative"):
        _C.silu_mul_raw(x.data_ptr(), x.data_ptr(), -1, x.data_ptr())
    p = x.data_ptr()
    args = [p] * 8
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        _C.attention_step_raw(*args, 1, 3, 2, 2, 1, 0, 1.0)
    with pytest.raises(ValueError, match="even"):
        _C.attention_step_raw(*args, 1, 2, 2, 3, 1, 0, 1.0)
    with pytest.raises(ValueError, match="outside the cache"):
        _C.attention_step_raw(*args, 1, 1, 1, 2, 1, 1, 1.0)
    with pytest.raises(ValueError, match="null pointer"):
        _C.attention_step_raw(*([0] * 8), 1, 1, 1, 2, 1, 0, 1.0)
    with pytest.raises(ValueError, match="exceeds 2"):
        _C.attention_step_raw(*args, 1 << 30, 1 << 30, 1, 2, 1, 0, 1.0)


CFG = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)


def _model() -> Llama:
    torch.manual_seed(0)
    m = Llama(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
    return m


def _decode(model: Llama, ids: torch.Tensor, fused: bool) -> torch.Tensor:
    model.fused_decode = fused
    cache = KVCache(model.config, ids.shape[0], ids.shape[1])
    with torch.no_grad():
        out = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache)
                                            for t in range(5, ids.shape[1])]
    return torch.cat(out, 1)


@pytest.mark.parametrize("isa", params())
def test_llama_fused_step_equals_module_forwards(isa):
    use(isa)
    model = _model()
    ids = torch.randint(0, 64, (2, 40), generator=_rng(5))
    calls = []
    model.model.norm.register_forward_hook(lambda *a: calls.append(1))
    hooked = _decode(model, ids, True)  # a hooked norm: every step through the modules
    assert len(calls) == 36
    model.model.norm._forward_hooks.clear()
    fused, plain = _decode(model, ids, True), _decode(model, ids, False)
    torch.testing.assert_close(fused, plain, rtol=2e-5, atol=2e-5)
    assert torch.equal(hooked, plain)
    with torch.no_grad():
        full = model(ids)  # the whole sequence at once: causal attention, no cache
    torch.testing.assert_close(fused, full, rtol=1e-4, atol=1e-4)  # as test_models' decode


def test_llama_fused_step_is_taken_only_where_it_computes_the_same():
    model = _model()
    ids = torch.randint(0, 64, (1, 12), generator=_rng(6))
    seen = []
    real = Llama._fused_step
    Llama._fused_step = lambda self, *a: seen.append(1) or real(self, *a)
    try:
        _decode(model, ids, True)
        assert len(seen) == 7
        seen.clear()
        model.model.layers[1].self_attn.attn_fn = lambda mod, q, k, v, keep: \
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        _decode(model, ids, True)
        model.model.layers[1].self_attn.attn_fn = None
        cache = KVCache(model.config, 1, 12)
        with torch.enable_grad():
            model(ids[:, :5], cache)
            model(ids[:, 5:6], cache)  # grad enabled: the modules, differentiable
        model.double()
        cache = KVCache(model.config, 1, 12, dtype=torch.float64)
        with torch.no_grad():
            model(ids[:, :5], cache)
            model(ids[:, 5:6], cache)  # float64: the modules
        assert not seen
    finally:
        Llama._fused_step = real
