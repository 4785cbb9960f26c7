"""QLoRA (qkern.lora): LoRA adapters over frozen NF4 (double-quantized) weights, checked
against an independent float reference: the base weight from ``qkern.quantize`` /
``qkern.dequantize`` of the float weight, used as a plain matrix with the LoRA formula
``y = x W^T + b + (x A^T B^T) alpha / r`` written here in plain torch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qkern
from qkern.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapters,
    lora_layers,
    merge_lora,
    register_peft,
    save_adapters,
)
from qkern.models import Llama, LlamaConfig

NF4 = {"fmt": "nf4", "group_size": 64, "double_quant": True}


def _float_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))


def _quantized(seed: int = 0):
    net = _float_net(seed)
    q = qkern.quantize_model(net, qkern.WeightOnlyConfig(**NF4))
    assert [q[0].kernel, q[2].kernel] == ["lut4_dq", "lut4_dq"]
    return net, q


def _deq(w: torch.Tensor) -> torch.Tensor:
    """The NF4 double-quantized weight, from the float weight through qkern.quantize."""
    q = qkern.quantize(w.detach().float(), "nf4", granularity="group", axis=1, group_size=64,
                       double_quant=True)
    return qkern.dequantize(q).float()


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def _reference(net, model, x, weights=None):
    """The LoRA network in plain torch: W from qkern.quantize of the float weights (or
    ``weights``), A and B from ``model``."""
    w = weights or [_deq(net[0].weight), _deq(net[2].weight)]
    lay = lora_layers(model)
    a = [lay["0"].lora_A, lay["2"].lora_A]
    b = [lay["0"].lora_B, lay["2"].lora_B]
    s = lay["0"].scaling
    h = x @ w[0].t() + net[0].bias.detach() + (x @ a[0].t() @ b[0].t()) * s
    h = torch.relu(h)
    return h @ w[1].t() + net[2].bias.detach() + (h @ a[1].t() @ b[1].t()) * s


def test_the_base_weight_is_qkern_quantize_of_the_float_weight():
    net, q = _quantized()
    torch.testing.assert_close(q[0].dequantize_weight(), _deq(net[0].weight), rtol=0, atol=0)


def test_a_new_adapter_leaves_the_output_unchanged_and_the_input_model_untouched():
    net, q = _quantized()
    before = copy.deepcopy(q.state_dict())
    m = apply_lora(q, LoRAConfig(rank=4, alpha=8, seed=0))
    x = torch.randn(5, 128)
    assert torch.equal(m(x), q(x))
    assert not lora_layers(q) and set(lora_layers(m)) == {"0", "2"}
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k])
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    assert torch.count_nonzero(m[0].lora_B) == 0 and torch.count_nonzero(m[0].lora_A) > 0
    bound = 1 / 128 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 128
    assert float(m[0].lora_A.detach().abs().max()) <= bound


def test_gradients_of_a_and_b_match_the_float_reference():
    net, q = _quantized()
    m = apply_lora(q, LoRAConfig(rank=4, alpha=8, seed=0))
    _randomize_b(m)
    x = torch.randn(2, 3, 128, requires_grad=True)
    g = torch.randn(2, 3, 64)
    (m(x) * g).sum().backward()
    ref = copy.deepcopy(m)
    for p in ref.parameters():
        p.grad = None
    xr = x.detach().clone().requires_grad_()
    y_ref = _reference(net, ref, xr)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(m(x.detach()), y_ref.detach(), rtol=1e-4, atol=1e-4)
    for name in ("0", "2"):
        for ab in ("lora_A", "lora_B"):
            got = getattr(lora_layers(m)[name], ab).grad
            want = getattr(lora_layers(ref)[name], ab).grad
            assert got is not None and float(got.abs().max()) > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_a_training_step_moves_only_the_adapters():
    net, q = _quantized()
    m = apply_lora(q, LoRAConfig(rank=4, alpha=8, seed=0))
    frozen = {n: t.clone() for n, t in m.state_dict().items() if "lora_" not in n}
    a0 = m[0].lora_A.detach().clone()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x, t = torch.randn(16, 128), torch.randn(16, 64)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(m(x), t).backward()
        opt.step()
    for n, t0 in frozen.items():
        assert torch.equal(m.state_dict()[n], t0), n
    for layer in lora_layers(m).values():
        assert all(b.grad is None for b in layer.base.buffers())
        assert layer.base.bias.grad is None and not layer.base.bias.requires_grad
    assert not torch.equal(m[0].lora_A, a0) and torch.count_nonzero(m[0].lora_B) > 0


def test_dropout_acts_on_the_adapter_branch_only_while_training():
    net, q = _quantized()
    m = apply_lora(q, LoRAConfig(rank=4, dropout=0.5, seed=0))
    _randomize_b(m)
    x = torch.randn(8, 128)
    m.eval()
    torch.testing.assert_close(m(x), _reference(net, m, x), rtol=1e-4, atol=1e-4)
    m.train()
    torch.manual_seed(3)
    y = m[0](x)
    torch.manual_seed(3)
    keep = nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    lay = m[0]
    want = q[0](x) + (x * keep) @ lay.lora_A.t() @ lay.lora_B.t() * lay.scaling
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


def test_float_merge_equals_the_adapted_model():
    net, q = _quantized()
    m = apply_lora(q, LoRAConfig(rank=4, alpha=8, seed=0))
    _randomize_b(m)
    merged = merge_lora(m)
    assert isinstance(merged[0], nn.Linear) and not lora_layers(merged) and lora_layers(m)
    lay = lora_layers(m)
    want_w = _deq(net[0].weight) + (lay["0"].lora_B @ lay["0"].lora_A).detach() * 2.0
    torch.testing.assert_close(merged[0].weight, want_w, rtol=1e-6, atol=1e-6)
    x = torch.randn(6, 128)
    torch.testing.assert_close(merged(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["name", "config"])
def test_requantized_merge_is_qkern_quantize_of_the_merged_weight(how):
    net, q = _quantized()
    m = apply_lora(q, LoRAConfig(rank=4, alpha=8, seed=0))
    _randomize_b(m)
    req = "nf4" if how == "name" else qkern.WeightOnlyConfig(**NF4)
    merged = merge_lora(m, requantize=req)
    lay = lora_layers(m)
    ws = []
    for name, lin in (("0", net[0]), ("2", net[2])):
        w = _deq(lin.weight) + (lay[name].lora_B @ lay[name].lora_A).detach() * lay[name].scaling
        ws.append(_deq(w))
        got = merged.get_submodule(name)
        assert isinstance(got, qkern.nn.QuantLinear) and got.kernel == "lut4_dq"
        torch.testing.assert_close(got.dequantize_weight(), ws[-1], rtol=0, atol=1e-6)
    x = torch.randn(6, 128)
    h = torch.relu(x @ ws[0].t() + net[0].bias.detach())
    torch.testing.assert_close(merged(x), h @ ws[1].t() + net[2].bias.detach(), rtol=1e-4,
                               atol=1e-4)


def test_adapters_round_trip_through_a_file(tmp_path):
    net, q = _quantized()
    m = apply_lora(q, LoRAConfig(rank=4, alpha=8, seed=0))
    _randomize_b(m)
    path = tmp_path / "adapters.safetensors"
    save_adapters(m, path)
    with pytest.raises(FileExistsError):
        save_adapters(m, path)
    save_adapters(m, path, overwrite=True)
    x = torch.randn(4, 128)
    fresh = load_adapters(q, path)  # applies LoRA to a model without it
    assert not lora_layers(q)
    assert torch.equal(fresh(x), m(x))
    other = apply_lora(q, LoRAConfig(rank=4, alpha=8, seed=5))
    loaded = load_adapters(other, path)
    assert torch.equal(loaded(x), m(x)) and not torch.equal(other(x), m(x))
    assert load_adapters(other, path, inplace=True) is other
    tensors = qkern.io.safetensors.read_safetensors(path)
    assert sorted(tensors) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]


def test_loading_refuses_adapters_that_do_not_fit(tmp_path):
    net, q = _quantized()
    path = tmp_path / "a.safetensors"
    save_adapters(apply_lora(q, LoRAConfig(rank=4, alpha=8)), path)
    with pytest.raises(ValueError, match="rank 2, alpha 8 in the model, rank 4"):
        load_adapters(apply_lora(q, LoRAConfig(rank=2, alpha=8)), path)
    with pytest.raises(ValueError, match="alpha 16 in the model"):
        load_adapters(apply_lora(q, LoRAConfig(rank=4, alpha=16)), path)
    with pytest.raises(ValueError, match="differ from the file"):
        load_adapters(apply_lora(q, LoRAConfig(rank=4, alpha=8, target_modules=["0"])), path)
    small = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"layer 0 is \(64, 128\) in the model, \(128, 128\)"):
        load_adapters(small, path)
    with pytest.raises(ValueError, match="no layer '2'"):
        load_adapters(nn.Sequential(nn.Linear(128, 128)), path)
    qkern.save(q, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a qkern LoRA adapter file"):
        load_adapters(q, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapters(q, tmp_path / "b.safetensors")


@pytest.mark.parametrize("kw,msg", [
    ({"rank": 0}, "rank must be an int >= 1"), ({"rank": 2.0}, "rank"), ({"rank": True}, "rank"),
    ({"alpha": 0}, "alpha must be a finite number > 0"), ({"alpha": float("nan")}, "alpha"),
    ({"alpha": "16"}, "alpha"), ({"dropout": 1.0}, "dropout must be a probability"),
    ({"dropout": -0.1}, "dropout"), ({"target_modules": []}, "target_modules"),
    ({"target_modules": ["q", 3]}, "target_modules"), ({"seed": 1.5}, "seed")])
def test_bad_config_values_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LoRAConfig(**kw)


def test_bad_targets_and_arguments_are_named():
    net, q = _quantized()
    with pytest.raises(ValueError, match="'v_proj' matches no QuantLinear"):
        apply_lora(q, LoRAConfig(target_modules=("v_proj",)))
    with pytest.raises(ValueError, match="no QuantLinear layer: quantize it first"):
        apply_lora(net, LoRAConfig())
    m = apply_lora(q, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already have LoRA adapters"):
        apply_lora(m, LoRAConfig(target_modules=("0",)))
    with pytest.raises(ValueError, match="has no QuantLinear"):
        apply_lora(m, LoRAConfig())  # nothing left to wrap
    with pytest.raises(TypeError, match="LoRAConfig"):
        apply_lora(q, {"rank": 4})
    with pytest.raises(TypeError, match="requantize must be"):
        merge_lora(m, requantize=4)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(q)
    with pytest.raises(TypeError, match="QuantLinear or nn.Linear"):
        LoRALinear(nn.ReLU(), LoRAConfig())


def test_float_layers_and_llama_names_can_be_targets():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64)
    model = Llama(cfg).eval()
    q = qkern.quantize_model(model, qkern.WeightOnlyConfig(**NF4, include=["model.layers.*"]))
    m = apply_lora(q, LoRAConfig(rank=2, target_modules=("q_proj", "v_proj", "lm_head")))
    assert sorted(lora_layers(m)) == ["lm_head"] + [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert isinstance(m.lm_head.base, nn.Linear) and not m.lm_head.base.weight.requires_grad
    ids = torch.randint(0, 256, (2, 16))
    assert torch.equal(m(ids), q(ids))
    nn.functional.cross_entropy(m(ids)[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_peft_lora_on_a_qkern_model_equals_qkern_lora(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is in the Makefile's deps")
    net, q = _quantized()
    cfg = register_peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    pm = peft.get_peft_model(copy.deepcopy(q), cfg)
    ours = apply_lora(q, LoRAConfig(rank=4, alpha=8))
    base = pm.base_model.model
    with torch.no_grad():
        for name in ("0", "2"):
            pl = base.get_submodule(name)
            pl.lora_B["default"].weight.normal_(0, 0.05)
            lay = lora_layers(ours)[name]
            lay.lora_A.copy_(pl.lora_A["default"].weight)
            lay.lora_B.copy_(pl.lora_B["default"].weight)
    x = torch.randn(2, 5, 128, requires_grad=True)
    g = torch.randn(2, 5, 64)
    y_peft, y_ours = pm(x), ours(x)
    torch.testing.assert_close(y_peft, y_ours, rtol=1e-6, atol=1e-6)
    (y_peft * g).sum().backward()
    (y_ours * g).sum().backward()
    for name in ("0", "2"):
        pl, lay = base.get_submodule(name), lora_layers(ours)[name]
        torch.testing.assert_close(pl.lora_A["default"].weight.grad, lay.lora_A.grad)
        torch.testing.assert_close(pl.lora_B["default"].weight.grad, lay.lora_B.grad)
    assert all(b.grad is None for b in base.get_submodule("0").base_layer.buffers())
    pm.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(
        copy.deepcopy(q), tmp_path, config=register_peft(peft.LoraConfig.from_pretrained(tmp_path)))
    torch.testing.assert_close(back(x.detach()), y_ours.detach(), rtol=1e-6, atol=1e-6)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("lora_" in n for n in trainable)
    with pytest.warns(UserWarning, match="re-quantizes"):
        plain = pm.merge_and_unload()
    assert isinstance(plain[0], qkern.nn.QuantLinear)
    lay = lora_layers(ours)["0"]
    want = _deq(_deq(net[0].weight) + (lay.lora_B @ lay.lora_A).detach() * lay.scaling)
    torch.testing.assert_close(plain[0].dequantize_weight(), want, rtol=0, atol=1e-6)
