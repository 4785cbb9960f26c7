"""AWQ (qkern.quantization.algorithms.awq) against independent references: the alpha of each
pair equals the one a brute-force search written here finds (numpy grid, every alpha
evaluated on the module the pair feeds), the clip search equals a per-group brute force on
sampled inputs, scaling alone keeps the function on every architecture, AWQ's block output
error is at most RTN's on the wikitext-bytelm, and ``then=`` hands the scaled layers on."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import llm_models as LM
import qkern
from qkern.models import load_llama
from qkern.models.assets import shipped_path
from qkern.quantization import AWQConfig, RTNConfig, find_blocks, quantize_sequential
from qkern.quantization import text_calibration as cut
from qkern.quantization.algorithms.awq import AWQQuantizer, clip_grams, clip_ratios, clip_search
from qkern.quantization.blocks import block_linears
from qkern.quantization.registry import Batch
from reference import quantize_int

VALID = shipped_path("data/wikitext-2/wiki.valid.tokens")


def _bytelm_cal(n=8, length=128):
    return cut(VALID, "bytes", n, length)


def _ref_rtn(w: np.ndarray, bits: int, group: int | None, sym: bool) -> np.ndarray:
    if group and w.shape[1] % group:
        group = None  # qkern's fallback: per output channel
    gran = ({"granularity": "group", "axis": 1, "group_size": group} if group
            else {"granularity": "channel", "axis": 0})
    return quantize_int(w.astype(np.float32), f"int{bits}", symmetric=sym, **gran)[3]


class _Grab:
    """Forward pre-hooks recording a module's (args, kwargs) and a linear's input rows."""

    def __init__(self, block, module: str, linear: str):
        self.calls, self.rows = [], []
        tgt = block.get_submodule(module) if module else block
        self.h = [tgt.register_forward_pre_hook(
            lambda m, a, k: self.calls.append((a, k)), with_kwargs=True),
            block.get_submodule(linear).register_forward_pre_hook(
                lambda m, a: self.rows.append(a[0].reshape(-1, a[0].shape[-1]).double()))]

    def close(self):
        for h in self.h:
            h.remove()


def _block_inputs(model, cal):
    """(args, kwargs) of block 0 on each calibration batch (the float model)."""
    _, blocks = find_blocks(model)
    got = []
    h = blocks[0].register_forward_pre_hook(
        lambda m, a, k: got.append((a, {**k, "past_key_values": None, "use_cache": False}
                                    if "use_cache" in k else k)), with_kwargs=True)
    with torch.no_grad():
        for b in cal:
            model(b)
    h.remove()
    return got


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _brute_force_alphas(model, cal, pairs, bits, group, n_grid=20):
    """For block 0, pair by pair: every alpha evaluated with numpy's RTN grid on the module
    the pair feeds (llm-awq's module2inspect), the best scales folded (float64) before the
    next pair. Returns {prev: (alpha, losses)}."""
    blk = copy.deepcopy(find_blocks(model)[1][0])
    ins = _block_inputs(model, cal)
    out = {}
    for prev, nexts, target in pairs:
        g = _Grab(blk, target, nexts[0])
        with torch.no_grad():
            for a, k in ins:
                blk(*a, **k)
        g.close()
        x = torch.cat(g.rows)
        x_mean = x.abs().mean(0).numpy()
        mod = blk.get_submodule(target)
        with torch.no_grad():
            ref = [_first(mod(*a, **k)).double() for a, k in g.calls]
        lins = [blk.get_submodule(n) for n in nexts]
        orig = [lin.weight.detach().clone() for lin in lins]
        losses, scales = [], []
        for i in range(n_grid):
            s = np.maximum(x_mean ** (i / n_grid), 1e-4)
            s = s / np.sqrt(s.max() * s.min())
            scales.append(s)
            with torch.no_grad():
                for lin, w in zip(lins, orig):
                    ws = (w.double().numpy() * s).astype(np.float32)
                    wq = (_ref_rtn(ws, bits, group, False).astype(np.float64) / s)
                    lin.weight.copy_(torch.from_numpy(wq.astype(np.float32)))
                err = sum(float((_first(mod(*a, **k)).double() - r).pow(2).sum())
                          for (a, k), r in zip(g.calls, ref))
            losses.append(err / sum(r.numel() for r in ref))
        best = int(np.argmin(losses))
        s = torch.from_numpy(scales[best])
        with torch.no_grad():
            for lin, w in zip(lins, orig):
                lin.weight.copy_((w.double() * s).float())
            p = blk.get_submodule(prev)
            for t in (p.weight, getattr(p, "bias", None)):
                if t is not None:
                    shape = (-1,) if t.dim() == 1 else (-1, 1)
                    t.copy_((t.double() / s.reshape(shape)).float())
        out[prev] = (best / n_grid, losses)
    return out


LLAMA_PAIRS = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
     "self_attn"),
    ("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"),
    ("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj"),
]
OPT_PAIRS = [
    ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
     "self_attn"),
    ("self_attn.v_proj", ["self_attn.out_proj"], "self_attn.out_proj"),
    ("final_layer_norm", ["fc1"], "fc1"),
    ("fc1", ["fc2"], "fc2"),
]


@pytest.mark.parametrize("which,bits,group", [("bytelm", 4, 128), ("bytelm", 3, 64),
                                              ("llama-mha", 3, 32), ("opt", 3, 32)])
def test_alpha_equals_brute_force(which, bits, group):
    if which == "bytelm":
        model = load_llama(shipped_path("models/wikitext-bytelm"))
        cal, pairs = _bytelm_cal(2, 64), LLAMA_PAIRS
    else:
        model, cal = LM.build(which), LM.calibration(4, 16)
        pairs = LLAMA_PAIRS if which.startswith("llama") else OPT_PAIRS
    want = _brute_force_alphas(model, cal, pairs, bits, group, n_grid=10)
    name = find_blocks(model)[0]
    q = AWQQuantizer(AWQConfig(bits=bits, group_size=group, clip=False, n_grid=10,
                               include=[f"{name}.0.*"]))  # block 0 only: faster
    quantize_sequential(model, q, cal)
    for prev, (alpha, losses) in want.items():
        key = f"{name}.0.{prev}"
        assert q.alphas[key] == alpha, (key, q.alphas[key], alpha, losses)
        np.testing.assert_allclose(q.losses[key], losses, rtol=1e-4, err_msg=key)
    assert len([k for k in q.alphas if k.startswith(f"{name}.0.")]) == len(pairs)
    assert any(a > 0 for a, _ in want.values())  # the scales are not all trivial


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, None, False), (4, 32, True)])
def test_clip_search_equals_per_group_brute_force(bits, group, sym):
    g = torch.Generator().manual_seed(3)
    n, k = 24, 64
    w = torch.randn(n, k, generator=g) * (1 + 3 * (torch.rand(n, k, generator=g) > 0.97))
    x = torch.randn(300, k, generator=g).double() * torch.linspace(0.2, 3, k).double()
    gs = k if group is None else group
    xg = x.reshape(len(x), -1, gs)
    blocks = torch.einsum("tga,tgb->gab", xg, xg) / len(x)
    ratios = clip_ratios(20, 0.5)
    mx, r = clip_search(w, blocks, bits, group, sym, ratios)
    # brute force: every ratio, numpy RTN of the clamped rows, error on the samples themselves
    wn = w.numpy().astype(np.float64)
    m = np.abs(wn.reshape(n, -1, gs)).max(-1)
    best = np.full(m.shape, np.inf)
    pick = np.zeros(m.shape)
    for ratio in ratios:
        lim = np.repeat((np.float32(ratio) * m.astype(np.float32)), gs, axis=1)
        wc = np.minimum(np.maximum(w.numpy(), -lim), lim)
        q = _ref_rtn(wc, bits, group, sym).astype(np.float64)
        d = (wn - q).reshape(n, -1, gs)
        err = ((np.einsum("nga,tga->tng", d, xg.numpy())) ** 2).mean(0)
        better = err < best * (1 - 1e-9)
        best[better], pick[better] = err[better], ratio
    np.testing.assert_allclose(r.numpy(), pick.astype(np.float32))
    np.testing.assert_allclose(mx.numpy(), (pick * m).astype(np.float32), rtol=1e-6)
    assert (r < 1).any()


class _ScaleOnly(AWQQuantizer):
    """AWQ's scale folding only: the layers stay float."""

    def quantize_block(self, ctx, log):
        pass


@pytest.mark.parametrize("arch", LM.ARCHS)
def test_scaling_alone_keeps_the_function(arch):
    model = LM.build(arch).double().float()
    ids = LM.calibration(1, 12, seed=5)[0]
    q = _ScaleOnly(AWQConfig(bits=3, group_size=32, clip=False))
    out = quantize_sequential(model, q, LM.calibration())
    assert any(a > 0 for a in q.alphas.values()), q.alphas
    changed = [n for n, p in out.named_parameters()
               if not torch.equal(p, model.get_parameter(n))
               and "weight" in n and p.shape == model.get_parameter(n).shape]
    assert changed  # the weights were rescaled ...
    want = LM.output(model, ids)
    torch.testing.assert_close(LM.output(out, ids), want, rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))  # ... and compute the same


@pytest.mark.parametrize("arch", LM.ARCHS)
def test_every_architecture_quantizes(arch):
    model = LM.build(arch)
    cal = LM.calibration()
    q = qkern.quantize_model(model, AWQConfig(bits=4, group_size=32), cal)
    name, fblocks = find_blocks(model)
    for fb, b in zip(fblocks, q.get_submodule(name)):
        kinds = {type(b.get_submodule(n)).__name__ for n in block_linears(fb)}
        assert kinds == {"QuantLinear"}, kinds
    ids = LM.calibration(1, 12, seed=5)[0]
    ref = LM.output(model, ids)
    rtn = qkern.quantize_model(model, RTNConfig(bits=4, group_size=32, sym=False), cal)
    e_awq = float((LM.output(q, ids) - ref).pow(2).mean())
    e_rtn = float((LM.output(rtn, ids) - ref).pow(2).mean())
    assert np.isfinite(e_awq) and e_awq < 2 * e_rtn, (e_awq, e_rtn)


def _block_errors(model, qmodel, cal):
    """Per block i: mean squared error of qmodel's block i against the float block i, both
    run on the float model's block-i inputs."""
    _, fb = find_blocks(model)
    qb = qmodel.get_submodule(find_blocks(model)[0])
    ins = {i: [] for i in range(len(fb))}
    hs = [b.register_forward_pre_hook(lambda m, a, k, i=i: ins[i].append((a, k)),
                                      with_kwargs=True) for i, b in enumerate(fb)]
    with torch.no_grad():
        for b in cal:
            model(b)
    for h in hs:
        h.remove()
    errs = []
    with torch.no_grad():
        for i in range(len(fb)):
            e = sum(float((qb[i](*a, **k) - fb[i](*a, **k)).pow(2).mean()) for a, k in ins[i])
            errs.append(e / len(ins[i]))
    return errs


@pytest.mark.parametrize("bits", [4, 3])
def test_block_error_below_rtn_on_the_bytelm(bits):
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    cal = _bytelm_cal(8, 64)
    awq = qkern.quantize_model(model, AWQConfig(bits=bits, group_size=128), cal)
    rtn = qkern.quantize_model(model, RTNConfig(bits=bits, group_size=128, sym=False), cal)
    held_out = cut(shipped_path("data/wikitext-2/wiki.test.tokens"), "bytes", 4, 128)
    ea, er = _block_errors(model, awq, held_out), _block_errors(model, rtn, held_out)
    assert all(a <= r for a, r in zip(ea, er)), (ea, er)
    assert sum(ea) < 0.9 * sum(er), (ea, er)


def test_then_hands_the_scaled_layers_on():
    model = LM.build("llama-mha")
    cal = LM.calibration()
    a = qkern.quantize_model(model, AWQConfig(bits=4, group_size=32), cal)
    b = qkern.quantize_model(model, AWQConfig(bits=4, group_size=32,
                                              then=RTNConfig(bits=4, group_size=32, sym=False)),
                             cal)
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    names = [n for n, m in ma.items() if type(m).__name__ == "QuantLinear"]
    assert len(names) == 14
    for n in names:
        assert type(mb[n]).__name__ == "QuantLinear"
        torch.testing.assert_close(ma[n].dequantize_weight(), mb[n].dequantize_weight(),
                                   rtol=0, atol=0)

    got = {}

    class Recorder(qkern.quantization.algorithms.rtn.RTNQuantizer):
        def quantize_layer(self, name, linear, gram, cfg):
            got[name] = linear.weight.detach().clone()
            return super().quantize_layer(name, linear, gram, cfg)

    q = AWQQuantizer(AWQConfig(bits=4, group_size=32))
    q.inner = Recorder(RTNConfig(bits=4, group_size=32, sym=False))
    c = quantize_sequential(model, q, cal)
    w = got["model.layers.1.mlp.down_proj"]
    assert not torch.equal(w, model.model.layers[1].mlp.down_proj.weight)  # scaled + clipped
    deq = _ref_rtn(w.numpy(), 4, 32, False)
    np.testing.assert_array_equal(c.model.layers[1].mlp.down_proj.dequantize_weight().numpy(),
                                  deq)


def test_config_validation_and_json():
    for bad in ({"n_grid": 0}, {"objective": "layer"}, {"clip": 1}, {"max_shrink": 0.99},
                {"bits": 9}, {"duo_scaling": "yes"}):
        with pytest.raises(ValueError):
            AWQConfig(**bad)
    with pytest.raises(ValueError, match="differs"):
        AWQConfig(bits=4, group_size=128, then=RTNConfig(bits=4, group_size=128, sym=True))
    cfg = AWQConfig(bits=3, group_size=64, duo_scaling=True,
                    then=RTNConfig(bits=3, group_size=64, sym=False))
    assert qkern.quantization.BaseConfig.from_json(cfg.to_json()) == cfg


def test_per_channel_duo_scaling_and_block_objective_run():
    model = LM.build("qwen2")
    cal = LM.calibration()
    for cfg in (AWQConfig(bits=4, group_size=None), AWQConfig(bits=8, group_size=None, sym=True),
                AWQConfig(bits=3, group_size=32, duo_scaling=True, objective="block")):
        q = AWQQuantizer(cfg)
        out = quantize_sequential(model, q, cal)
        assert type(out.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
        assert len(q.alphas) == 2 * 3  # qkv, gate/up, down per block (GQA: no v -> o)
        assert torch.isfinite(LM.output(out, cal[0])).all()


@pytest.mark.parametrize("tokens", [None, 7, 40])
def test_clip_grams_on_llm_awqs_token_sample(tokens):
    """llm-awq's auto_clip: the error on rows ``x[0 :: T // n_sample_token]`` of all the
    calibration tokens concatenated; a naive gather of those rows here."""
    model = LM.build("llama")
    cal = LM.calibration()
    blk = find_blocks(model)[1][0]
    ins = _block_inputs(model, cal)
    name, g = "mlp.down_proj", 32
    grab = _Grab(blk, "", name)
    with torch.no_grad():
        for a, k in ins:
            blk(*a, **k)
    grab.close()
    x = torch.cat(grab.rows)
    if tokens is not None:
        x = x[0::len(x) // tokens]
    xg = x.reshape(len(x), -1, g)
    want = torch.einsum("tga,tgb->gab", xg, xg) / len(x)
    got = clip_grams(blk, [Batch(a, k) for a, k in ins], {name: g}, tokens)[name]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_next_block_is_searched_on_the_float_models_activations():
    """llm-awq's run_awq takes block i+1's inputs from block i before auto_scale / auto_clip:
    with ``inputs="float"`` every block's search sees the float model's activations (the
    scales keep the function, the clip ranges are applied only when quantizing)."""
    model = LM.build("llama").double().float()
    cal = LM.calibration()
    _, blocks = find_blocks(model)
    want = []
    hs = [b.register_forward_pre_hook(
        lambda m, a, k: want.append((a[0] if a else k["hidden_states"]).detach().clone()),
        with_kwargs=True) for b in blocks]
    with torch.no_grad():
        for b in cal:
            model(b)
    for h in hs:
        h.remove()
    seen = []

    class Spy(AWQQuantizer):
        def process_block(self, ctx):
            seen.extend((b.args[0] if b.args else b.kwargs["hidden_states"]).clone()
                        for b in ctx.inputs)
            super().process_block(ctx)

    q = Spy(AWQConfig(bits=3, group_size=32, inputs="float"))
    quantize_sequential(model, q, cal)
    assert any((r < 1).any() for r in q.clips.values())  # the clip did shrink some ranges
    n = len(cal)
    want = [w for i in range(len(blocks)) for w in want[i::len(blocks)]][:len(seen)]
    assert len(seen) == len(want) == n * len(blocks)
    for s, w in zip(seen, want):
        torch.testing.assert_close(s, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
