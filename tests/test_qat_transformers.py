"""QAT of transformers (QATConfig(attention=True)): the fake-quantized attention against an
eager attention written here from the definitions (Q, K, V and the softmax probabilities on
their learned grids), on tiny random transformers Llama (GQA, causal) and BERT (padding) and
on qkern's own BERT; lm_head / embeddings float; convert; errors."""

import copy

import pytest
import torch
import transformers
from torch import nn

import llm_models as LM
import qkern
from qkern.models.bert import Bert, BertConfig
from qkern.nn import QuantLinear
from qkern.quantization import QATConfig
from qkern.quantization.qat import AttentionQuant, QATLinear


def fq(x, s, lo, hi):
    """x on the grid s * {lo..hi}, round half to even (x * (1 / s), as the kernels)."""
    s = s.detach()
    return torch.clamp(torch.round(x * (1.0 / s)), lo, hi) * s


def ref_eager(qa, q, k, v, mask, scaling):
    """softmax(fq(Q) fq(K)^T * scaling + mask) on P's unsigned grid, times fq(V)."""
    qq, kk, vv = (fq(t, m.scale, -128, 127) for t, m in ((q, qa.q), (k, qa.k), (v, qa.v)))
    s = qq @ kk.transpose(-2, -1) * scaling
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = fq(torch.softmax(s.float(), -1), qa.p.scale, 0, 255)
    return p @ vv


def ref_transformers(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kw):
    n = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n, 1), value.repeat_interleave(n, 1)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = ref_eager(module.qat_attention, query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("test_ref_qat", ref_transformers)
transformers.masking_utils.AttentionMaskInterface.register(
    "test_ref_qat", transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def prepared(arch, **kw):
    model = LM.build(arch)
    q = qkern.prepare(model, QATConfig(weight=4, activation=8, attention=True, **kw))
    return model, q


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_transformers_attention_matches_reference(arch):
    model, q = prepared(arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, LM.VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding (BERT) / a shorter sequence (Llama, left-aligned)
    with torch.no_grad():
        q(input_ids=ids, attention_mask=mask)  # the first batch sets the step sizes
    q.eval()
    # the prepared copy runs qkern's attention; the float model is untouched
    assert q.config._attn_implementation == "qkern_qat"
    assert model.config._attn_implementation != "qkern_qat"
    assert not any(isinstance(m, AttentionQuant) for m in model.modules())
    quants = [m for m in q.modules() if isinstance(m, AttentionQuant)]
    assert len(quants) == 2 and all(bool(m.q.initialized) for m in quants)
    ref = copy.deepcopy(q)
    ref.config._attn_implementation = "test_ref_qat"
    for m in ref.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "test_ref_qat"
    with torch.no_grad():
        got = LM.output(q, ids) if arch == "llama" else q(input_ids=ids,
                                                            attention_mask=mask)[0]
        want = LM.output(ref, ids) if arch == "llama" else ref(input_ids=ids,
                                                                attention_mask=mask)[0]
        plain = copy.deepcopy(q)
        plain.config._attn_implementation = "eager"
        other = LM.output(plain, ids) if arch == "llama" else plain(input_ids=ids,
                                                                    attention_mask=mask)[0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert float((got - other).abs().max()) > 1e-3  # the attention quantizers do act


def test_defaults_keep_lm_head_float_and_train_the_attention_scales():
    model, q = prepared("llama")
    assert type(q.lm_head) is nn.Linear and isinstance(q.lm_head.weight, nn.Parameter)
    assert type(q.model.embed_tokens) is nn.Embedding
    assert all(isinstance(getattr(q.model.layers[0].self_attn, n), QATLinear)
               for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ids = torch.randint(0, LM.VOCAB, (2, 10))
    q.train()
    out = q(ids).logits
    out.square().mean().backward()
    qa = q.model.layers[1].self_attn.qat_attention
    for sub in (qa.q, qa.k, qa.v, qa.p):
        assert sub.scale.grad is not None and float(sub.scale.grad.abs()) > 0


def test_convert_linears_on_kernels_attention_stays_fake():
    _, q = prepared("llama")
    ids = torch.randint(0, LM.VOCAB, (2, 10))
    with torch.no_grad():
        q(ids)
    q.eval()
    with torch.no_grad():
        fake = q(ids).logits
        d = qkern.convert(q)
        got = d(ids).logits
    attn = d.model.layers[0].self_attn
    assert any(isinstance(m, QuantLinear) for m in attn.modules())
    assert isinstance(attn.qat_attention, AttentionQuant)
    torch.testing.assert_close(got, fake, atol=1e-3, rtol=1e-3)


def test_qkern_bert_hook_matches_reference():
    torch.manual_seed(0)
    bert = Bert(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64)).eval()
    q = qkern.prepare(bert, QATConfig(weight=4, activation=8, attention=True))
    assert all(m.attn_fn is None for m in bert.modules() if hasattr(m, "attn_fn"))
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        q(ids, mask)
        got = q(ids, mask)
        ref = copy.deepcopy(q)
        for m in ref.modules():
            if getattr(m, "attn_fn", None) is not None:
                m.attn_fn = lambda mod, a, b, c, keep: ref_eager(
                    mod.qat_attention, a, b, c, keep, a.shape[-1] ** -0.5)
        want = ref(ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-4, rtol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="attention"):
        QATConfig(activation=None, attention=True)
    with pytest.raises(ValueError, match="lsq_init"):
        QATConfig(lsq_init="mean")
    with pytest.raises(ValueError, match="attention"):
        QATConfig(attention=1)
    with pytest.raises(ValueError, match="no attention module"):
        qkern.prepare(nn.Sequential(nn.Linear(4, 4)), QATConfig(attention=True))


def test_lsq_max_init_is_round_to_nearest():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    q = qkern.prepare(nn.Sequential(lin), QATConfig(weight=4, activation=None,
                                                    lsq_init="max"))
    want = lin.weight.detach().abs().amax(1) / 7
    torch.testing.assert_close(q[0].weight_fake.scale.detach(), want)


def tiny_qkern_llama():
    from qkern.models.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Llama(cfg).eval()


def test_qkern_llama_hook_matches_reference():
    model = tiny_qkern_llama()
    q = qkern.prepare(model, QATConfig(weight=4, activation=8, attention=True))
    assert all(m.attn_fn is None for m in model.modules() if hasattr(m, "attn_fn"))
    ids = torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        q(ids)
        q.eval()
        got = q(ids)
        ref = copy.deepcopy(q)
        causal = torch.ones(11, 11, dtype=torch.bool).tril()
        for m in ref.modules():
            if getattr(m, "attn_fn", None) is not None:
                m.attn_fn = lambda mod, a, b, c, keep: ref_eager(
                    mod.qat_attention, a, b, c, causal, a.shape[-1] ** -0.5)
        want = ref(ids)
        plain = copy.deepcopy(q)
        for m in plain.modules():
            if hasattr(m, "attn_fn"):
                m.attn_fn = None
        other = plain(ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert float((got - other).abs().max()) > 1e-3  # the attention quantizers do act


def test_kv_cache_decode_equals_the_full_forward():
    """Prefill + one-token steps through the KV cache give the full forward's logits: the
    cached K / V go through the same (frozen, eval-mode) quantizers as the recomputed ones.
    qkern's Llama (its KVCache) and transformers' Llama (its DynamicCache)."""
    from qkern.models.llama import KVCache
    model = tiny_qkern_llama()
    q = qkern.prepare(model, QATConfig(weight=4, activation=8, attention=True))
    ids = torch.randint(0, 40, (1, 12))
    with torch.no_grad():
        q(ids)
        q.eval()
        full = q(ids)
        cache = KVCache(q.config, 1, 12)
        steps = [q(ids[:, :5], cache)] + [q(ids[:, i:i + 1], cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-4, rtol=1e-4)
    want = q.generate(ids[0, :4], 6)
    assert len(want) == 6
    with torch.no_grad():
        d = qkern.convert(q)
    assert torch.equal(d.generate(ids[0, :4], 6), want)  # same greedy tokens on the kernels

    _, hf = prepared("llama")
    ids = torch.randint(0, LM.VOCAB, (1, 12))
    with torch.no_grad():
        hf(input_ids=ids)
        hf.eval()
        full = hf(input_ids=ids).logits
        out = hf(input_ids=ids[:, :5], use_cache=True)
        steps, past = [out.logits], out.past_key_values
        for i in range(5, 12):
            out = hf(input_ids=ids[:, i:i + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
        gen = hf.generate(ids[:, :4], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-4, rtol=1e-4)
    assert gen.shape == (1, 10)
