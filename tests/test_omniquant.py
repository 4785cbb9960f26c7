"""OmniQuant (learnable weight clipping + learnable equivalent transformation, trained block by
block): the LWC grid against the numpy reference of docs/numerics.md (tests/reference.py), at
init and after training; the trained block's output error below RTN's and falling over the
epochs, on tiny transformers models and on the shipped wikitext-bytelm; the QuantLinear
weights equal to the trained fake quantization; bad configs refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llm_models as LM
import qkern
from qkern.models import load_llama
from qkern.models.assets import shipped_path
from qkern.quantization import (
    GPTQConfig,
    OmniQuantConfig,
    RTNConfig,
    find_blocks,
    text_calibration,
)
from qkern.quantization.algorithms.omniquant import (
    OmniQuantQuantizer,
    act_fake_quant,
    lwc_fake_quant,
    round_ste,
)
from qkern.quantization.blocks import block_linears
from reference import F32, int_range, quantize_int, sanitize_scale


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Training runs many small ops: on the shared 2-core box, 2 torch threads were 12x
    slower than 1 (OpenMP waits); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ref_lwc(w: np.ndarray, group: int, bits: int, sym: bool, gam, bet) -> np.ndarray:
    """The paper's eq. 2 on qkern's grid, in numpy float32: ``hi = gam * max``,
    ``lo = bet * min`` per group (zero kept in range), then quantize_int with those scales."""
    qmin, qmax = int_range(f"int{bits}")
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    hi = np.maximum((np.asarray(gam, F32) * wg.max(-1)).astype(F32), F32(0))
    lo = np.minimum((np.asarray(bet, F32) * wg.min(-1)).astype(F32), F32(0))
    if sym:
        sc = sanitize_scale(np.maximum(hi, -lo) / F32(qmax))
        zp = None
    else:
        sc = sanitize_scale((hi - lo) / F32(qmax - qmin))
        zp = np.clip(qmin - np.rint((lo / sc).astype(F32)), qmin, qmax).astype(np.int32)
    *_, deq = quantize_int(w, f"int{bits}", granularity="group", axis=1, group_size=group,
                           symmetric=sym, scale=sc, zero_point=zp)
    return deq


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 64, False), (2, 32, False),
                                            (4, 32, True)])
def test_lwc_fake_quant_equals_numpy_reference(bits, group, sym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 128, generator=g)
    w[3, :group] = 0.0  # a group of zeros
    w[5, :group] = w[5, :group].abs() + 0.1  # a positive group: zero stays representable
    up = torch.randn(12, 128 // group, generator=g) + 3
    low = torch.randn(12, 128 // group, generator=g) + 3
    deq = lwc_fake_quant(w, group, bits, sym, up, low)[0]
    ref = _ref_lwc(w.numpy(), group, bits, sym, torch.sigmoid(up).numpy(),
                   torch.sigmoid(low).numpy())
    np.testing.assert_array_equal(deq.numpy(), ref)
    # paper's init: sigmoid(4) = 0.982 clip; without clip params: qkern's min-max RTN grid
    four = torch.full_like(up, 4.0)
    np.testing.assert_array_equal(
        lwc_fake_quant(w, group, bits, sym, four, four)[0].numpy(),
        _ref_lwc(w.numpy(), group, bits, sym, np.full(up.shape, 1 / (1 + np.exp(-4)), F32),
                 np.full(up.shape, 1 / (1 + np.exp(-4)), F32)))
    *_, rtn = quantize_int(w.numpy(), f"int{bits}", granularity="group", axis=1,
                           group_size=group, symmetric=sym)
    np.testing.assert_array_equal(lwc_fake_quant(w, group, bits, sym)[0].numpy(), rtn)


def test_round_ste_gradient_is_identity():
    x = torch.tensor([0.2, 1.5, 2.5, -0.7], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 4


def test_lwc_gradient_reaches_clip_logits():
    w = torch.randn(4, 64)
    up = torch.full((4, 2), 4.0, requires_grad=True)
    low = torch.full((4, 2), 4.0, requires_grad=True)
    deq = lwc_fake_quant(w, 32, 2, False, up, low)[0]
    ((deq - w) ** 2).sum().backward()
    assert up.grad.abs().sum() > 0 and low.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_untrained_lwc_equals_rtn(arch):
    """epochs=0 with clip logits at 30 (sigmoid = 1.0 in float32): RTN's weights exactly."""
    model, cal = LM.build(arch), LM.calibration(2, 8)
    q = qkern.quantize_model(model, OmniQuantConfig(bits=3, group_size=32, epochs=0,
                                                    lwc_init=30.0), cal)
    r = qkern.quantize_model(model, RTNConfig(bits=3, group_size=32, sym=False), cal)
    qm, rm = dict(q.named_modules()), dict(r.named_modules())
    name, blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        for rel in block_linears(b):
            n = f"{name}.{i}.{rel}"
            assert torch.equal(qm[n].dequantize_weight(), rm[n].dequantize_weight()), n


def _block0_mse(model, qmodel, ids_list) -> float:
    """Mean squared error of block 0's output, quantized vs float, on the same inputs."""
    outs, name = [], find_blocks(model)[0]
    for m in (model, qmodel):
        got = []
        blk = m.get_submodule(f"{name}.0")
        h = blk.register_forward_hook(lambda mod, a, o: got.append(o[0] if isinstance(
            o, tuple) else o))
        with torch.no_grad():
            for ids in ids_list:
                m(ids)
        h.remove()
        outs.append(torch.cat([g.reshape(-1) for g in got]))
    return float((outs[0] - outs[1]).pow(2).mean())


def _check_weights_are_trained_fake_quant(model, qmodel, quantizer, cfg):
    """Each QuantLinear's weight = the numpy reference of the LWC grid with the learned clip
    factors applied to the float weight (LET off: the weights are the model's own)."""
    name, blocks = find_blocks(model)
    mods = dict(qmodel.named_modules())
    n_checked = 0
    for i, b in enumerate(blocks):
        for rel in block_linears(b):
            full = f"{name}.{i}.{rel}"
            if full not in quantizer.clips:
                continue
            m = b.get_submodule(rel)
            w = m.weight.detach().float()
            w = w.t() if type(m).__name__ == "Conv1D" else w
            gam, bet = quantizer.clips[full]
            group = w.shape[1] // gam.shape[1]
            ref = _ref_lwc(w.numpy(), group, cfg.bits, cfg.sym, gam.numpy(), bet.numpy())
            np.testing.assert_array_equal(mods[full].dequantize_weight().numpy(), ref, full)
            n_checked += 1
    assert n_checked > 0


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen3"])
def test_training_beats_rtn_on_tiny_models(arch):
    model, cal = LM.build(arch), LM.calibration(4, 16)
    cfg = OmniQuantConfig(bits=2, group_size=32, epochs=6, lr_lwc=0.1)
    quantizer = OmniQuantQuantizer(cfg)
    q = qkern.quantization.quantize_sequential(model, quantizer, cal)
    r = qkern.quantize_model(model, RTNConfig(bits=2, group_size=32, sym=False), cal)
    for blk, hist in quantizer.history.items():
        assert len(hist) == cfg.epochs + 1
        assert hist[-1] < hist[0] and min(hist[1:]) < hist[0], (blk, hist)
    assert _block0_mse(model, q, cal) < _block0_mse(model, r, cal)
    _check_weights_are_trained_fake_quant(model, q, quantizer, cfg)
    assert {x.name for x in quantizer.report} == set(quantizer.clips)
    assert all(np.isfinite(x.error) for x in quantizer.report)


def test_let_folds_and_trains():
    """LET: scales between the norms / v / up and their linears, trained then folded; the
    block's loss falls and the quantized model stays close to the float one."""
    model, cal = LM.build("llama-mha"), LM.calibration(4, 16)
    cfg = OmniQuantConfig(bits=4, group_size=32, epochs=4, let=True, lr_lwc=0.05,
                          lr_let=0.01)
    quantizer = OmniQuantQuantizer(cfg)
    q = qkern.quantization.quantize_sequential(model, quantizer, cal)
    for blk, hist in quantizer.history.items():
        assert hist[-1] < hist[0], (blk, hist)
    ids = cal[0]
    ref = LM.output(model, ids)
    err = float((LM.output(q, ids) - ref).pow(2).mean() / ref.pow(2).mean())
    assert err < 0.05
    # the norms now hold 1/s: the model's own norm weights are untouched
    assert torch.equal(model.model.layers[0].input_layernorm.weight,
                       LM.build("llama-mha").model.layers[0].input_layernorm.weight)
    assert not torch.equal(q.model.layers[0].input_layernorm.weight,
                           model.model.layers[0].input_layernorm.weight)


def test_act_fake_quant_is_the_w8a8_kernels_activation_grid():
    x = torch.randn(5, 64) * torch.tensor([0.01, 1, 3, 0, 100]).reshape(5, 1)
    xn = x.numpy()
    sx = (np.abs(xn).max(1, keepdims=True) / F32(127)).astype(F32)
    sx[sx == 0] = 1
    ref = (np.clip(np.rint(xn * (F32(1) / sx)), -127, 127) * sx).astype(F32)
    np.testing.assert_array_equal(act_fake_quant(x).numpy(), ref)
    lin = torch.nn.Linear(64, 16)
    ql = qkern.nn.QuantLinear.from_float(lin, "int8", group_size=None, act="int8_dynamic")
    want = torch.nn.functional.linear(act_fake_quant(x), ql.dequantize_weight(), lin.bias)
    torch.testing.assert_close(ql(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["opt", "llama-mha"])
def test_w8a8_with_let(arch):
    """Weight-activation W8A8: LET + LWC trained with int8 per-token inputs; layers run on
    the w8a8 kernel and the model stays close to the float one."""
    model, cal = LM.build(arch), LM.calibration(4, 16)
    cfg = OmniQuantConfig(bits=8, group_size=None, sym=True, act_bits=8, let=True,
                          epochs=4, lr_lwc=0.01, lr_let=1e-3)
    quantizer = OmniQuantQuantizer(cfg)
    q = qkern.quantization.quantize_sequential(model, quantizer, cal)
    layers = [m for m in q.modules() if isinstance(m, qkern.nn.QuantLinear)]
    assert layers and all(m.act == "int8_dynamic" for m in layers)
    for blk, hist in quantizer.history.items():  # W8A8 losses are tiny and noisy here
        assert min(hist[1:]) < hist[0], (blk, hist)
    ids = cal[0]
    ref = LM.output(model, ids)
    assert float((LM.output(q, ids) - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-3


def test_bytelm_block_error_below_rtn():
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    with open(shipped_path("data/wikitext-2/wiki.valid.tokens"), "rb") as f:
        cal = text_calibration(f.read(), "bytes", 4, 128)
    name = find_blocks(model)[0]
    cfg = OmniQuantConfig(bits=2, group_size=64, epochs=4, lr_lwc=0.1,
                          include=[f"{name}.0.*"])
    quantizer = OmniQuantQuantizer(cfg)
    q = qkern.quantization.quantize_sequential(model, quantizer, cal)
    r = qkern.quantize_model(model, RTNConfig(bits=2, group_size=64, sym=False,
                                              include=[f"{name}.0.*"]), cal)
    hist = quantizer.history[f"{name}.0"]
    assert hist[-1] < hist[0], hist
    assert _block0_mse(model, q, cal) < _block0_mse(model, r, cal)
    _check_weights_are_trained_fake_quant(model, q, quantizer, cfg)


@pytest.mark.parametrize("kw", [
    {"bits": 1}, {"bits": 9}, {"group_size": 0}, {"sym": "no"}, {"lwc": 1}, {"let": None},
    {"epochs": -1}, {"epochs": 2.5}, {"batch_size": 0}, {"lr_lwc": -1e-3},
    {"lr_let": float("nan")}, {"wd": -0.1}, {"lwc_init": 100.0}, {"let_alpha": 1.5},
    {"target": "teacher"}, {"lwc": False, "let": False}, {"act_bits": 4},
    {"act_bits": 8}, {"act_bits": 8, "bits": 8, "group_size": None, "sym": False},
])
def test_bad_config_raises(kw):
    with pytest.raises(ValueError, match="OmniQuantConfig"):
        OmniQuantConfig(**kw)


def test_needs_calibration_and_fused_kernel():
    model = LM.build("llama")
    with pytest.raises(ValueError, match="calibration"):
        qkern.quantize_model(model, OmniQuantConfig(epochs=1), None)
    with pytest.raises(ValueError, match="fused kernel"):
        qkern.quantize_model(model, OmniQuantConfig(bits=8, group_size=32, epochs=1),
                             LM.calibration(1, 8))


def test_float_target_carried_past_unquantized_blocks():
    """Only block 1 quantized: its inputs are the float model's, so the float-model target
    (carried through block 0) equals the float block's output on its inputs."""
    model, cal = LM.build("llama"), LM.calibration(2, 8)
    hist = {}
    for target in ("float", "block"):
        quantizer = OmniQuantQuantizer(OmniQuantConfig(
            bits=2, group_size=32, epochs=2, lr_lwc=0.1, target=target,
            include=["model.layers.1.*"]))
        qkern.quantization.quantize_sequential(model, quantizer, cal)
        hist[target] = quantizer.history
    assert list(hist["float"]) == ["model.layers.1"]
    assert hist["float"] == hist["block"]


def test_trains_under_no_grad():
    model, cal = LM.build("llama"), LM.calibration(2, 8)
    quantizer = OmniQuantQuantizer(OmniQuantConfig(bits=2, group_size=32, epochs=2,
                                                   lr_lwc=0.1))
    with torch.no_grad():
        qkern.quantization.quantize_sequential(model, quantizer, cal)
    assert all(not torch.equal(g, torch.full_like(g, float(torch.sigmoid(torch.tensor(4.0)))))
               for g, _ in quantizer.clips.values())


def test_cannot_be_handed_single_layers():
    q = OmniQuantQuantizer(OmniQuantConfig())
    with pytest.raises(ValueError, match="whole blocks"):
        q.quantize_layer("x", torch.nn.Linear(32, 8), None, q.config)


def test_config_round_trips_json():
    cfg = OmniQuantConfig(bits=3, group_size=64, epochs=2, let=True, lr_lwc=0.05,
                          aug_loss=True, then=GPTQConfig(bits=3, group_size=64, sym=False))
    assert qkern.quantization.BaseConfig.from_json(cfg.to_json()) == cfg


def test_then_without_clipping_is_the_inner_method():
    """No training, clip factors 1.0 (logits 30): then=GPTQ gives GPTQ's weights exactly."""
    model, cal = LM.build("llama"), LM.calibration(2, 8)
    g = GPTQConfig(bits=2, group_size=32, sym=False)
    q = qkern.quantize_model(model, OmniQuantConfig(bits=2, group_size=32, epochs=0,
                                                    lwc_init=30.0, then=g), cal)
    r = qkern.quantize_model(model, g, cal)
    qm, rm = dict(q.named_modules()), dict(r.named_modules())
    name, blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        for rel in block_linears(b):
            n = f"{name}.{i}.{rel}"
            assert torch.equal(qm[n].dequantize_weight(), rm[n].dequantize_weight()), n


def test_then_rtn_rounds_inside_the_learned_clip():
    """then=RTN on the clamped weights: the numpy reference of the LWC grid with the learned
    factors (min-max of the clamped group is the learned range)."""
    model, cal = LM.build("llama"), LM.calibration(2, 8)
    cfg = OmniQuantConfig(bits=2, group_size=32, epochs=2, lr_lwc=0.1,
                          then=RTNConfig(bits=2, group_size=32, sym=False))
    quantizer = OmniQuantQuantizer(cfg)
    q = qkern.quantization.quantize_sequential(model, quantizer, cal)
    _check_weights_are_trained_fake_quant(model, q, quantizer, cfg)


@pytest.mark.parametrize("field,value", [("bits", 3), ("group_size", 32), ("sym", True)])
def test_then_must_match_bits_group_and_sym(field, value):
    kw = {"bits": 2, "group_size": 64, "sym": False}
    with pytest.raises(ValueError, match=f"GPTQConfig.{field}=.* differs from"):
        OmniQuantConfig(**kw, then=GPTQConfig(**{**kw, field: value}))


def test_then_refused_with_activations():
    with pytest.raises(ValueError, match="then"):
        OmniQuantConfig(bits=8, group_size=None, sym=True, act_bits=8,
                        then=GPTQConfig(bits=8, group_size=None, sym=True))


def _ref_lwc_train(block, args, kwargs, targets, bits, group, steps, lr):
    """The authors' LWC training of one block, written from their equations in plain torch:
    per group ``hi = sigmoid(g) max``, ``lo = sigmoid(b) min``, ``s = (hi - lo) / (2^N - 1)``,
    ``zp = round(-lo / s)``, ``w_q = (clamp(round_ste(w / s) + zp, 0, 2^N - 1) - zp) s``, loss
    the sum of the MSEs to each target, AdamW (wd 0) at ``lr``, one step per call.
    Returns {layer: (sigmoid(g), sigmoid(b))}."""
    from torch.func import functional_call

    ws = {n: block.get_submodule(n).weight.detach().float() for n in block_linears(block)}
    ps = {n: (torch.full((w.numel() // group, 1), 4.0, requires_grad=True),
              torch.full((w.numel() // group, 1), 4.0, requires_grad=True))
          for n, w in ws.items()}
    opt = torch.optim.AdamW([p for pair in ps.values() for p in pair], lr=lr, weight_decay=0.0)
    top = 2 ** bits - 1
    for _ in range(steps):
        eff = {}
        for n, w in ws.items():
            up, low = ps[n]
            wg = w.reshape(-1, group)
            hi = torch.sigmoid(up) * wg.amax(1, keepdim=True)
            lo = torch.sigmoid(low) * wg.amin(1, keepdim=True)
            s = ((hi - lo) / top).clamp(min=1e-5)
            zp = torch.round(-lo / s).detach()
            t = wg / s
            q = (t + (torch.round(t) - t).detach() + zp).clamp(0, top)
            eff[f"{n}.weight"] = ((q - zp) * s).reshape(w.shape)
        o = functional_call(block, eff, args, kwargs, strict=False)
        o = o[0] if isinstance(o, tuple) else o
        loss = sum(torch.nn.functional.mse_loss(o, y) for y in targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: (torch.sigmoid(u.detach()).reshape(ws[n].shape[0], -1),
                torch.sigmoid(b.detach()).reshape(ws[n].shape[0], -1)) for n, (u, b) in ps.items()}


def _block_call(model, name, idx, ids):
    """(args, kwargs, output) of block ``name.idx`` of ``model`` on ``ids``."""
    blk, got = model.get_submodule(f"{name}.{idx}"), {}
    h1 = blk.register_forward_pre_hook(lambda m, a, k: got.update(a=a, k=k), with_kwargs=True)
    h2 = blk.register_forward_hook(lambda m, a, o: got.update(o=o[0] if isinstance(o, tuple)
                                                              else o))
    with torch.no_grad():
        model(ids, use_cache=False)
    h1.remove()
    h2.remove()
    return got["a"], got["k"], got["o"]


@pytest.mark.parametrize("aug", [False, True])
def test_block1_training_equals_authors_procedure(aug):
    """Block 1 of a tiny Llama, 1 sample x 3 epochs: the learned clip factors equal the
    authors' procedure written independently (inputs: the quantized block 0's output; target:
    the float model's block output; aug_loss adds the float block on the quantized inputs)."""
    model, cal = LM.build("llama"), LM.calibration(1, 16)
    bits, group, steps, lr = 2, 32, 3, 0.05
    q = OmniQuantQuantizer(OmniQuantConfig(bits=bits, group_size=group, epochs=steps,
                                           lr_lwc=lr, aug_loss=aug))
    qm = qkern.quantization.quantize_sequential(model, q, cal)
    name, blocks = find_blocks(model)
    fargs, fkw, fout = _block_call(model, name, 1, cal[0])
    qargs, qkw, _ = _block_call(qm, name, 1, cal[0])
    assert not torch.equal(qargs[0], fargs[0])  # the quantized prefix changed the inputs
    with torch.no_grad():
        same = blocks[1](*qargs, **qkw)
    targets = [fout] + ([same[0] if isinstance(same, tuple) else same] if aug else [])
    ref = _ref_lwc_train(blocks[1], qargs, qkw, targets, bits, group, steps, lr)
    other = _ref_lwc_train(blocks[1], qargs, qkw, targets[:1] if aug else targets + [
        same[0] if isinstance(same, tuple) else same], bits, group, steps, lr)
    moved = 0
    for rel, (gam, bet) in ref.items():
        got = q.clips[f"{name}.1.{rel}"]
        torch.testing.assert_close(got[0], gam, rtol=0, atol=2e-6)
        torch.testing.assert_close(got[1], bet, rtol=0, atol=2e-6)
        moved += int(((other[rel][0] - gam).abs() > 1e-5).sum())
    assert moved > 0  # the loss with / without the aug term trains differently here
