"""qkern.mixed_precision: Hutchinson traces against the exact Hessian (autograd.functional),
the Fisher diagonal against per-sample gradients by torch.func, the knapsack against brute
force over every assignment, greedy within budget, and the overrides built into the layers
they name."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import qkern
from llm_models import build, calibration
from qkern import mixed_precision as mp
from qkern.mixed_precision import LayerSensitivity, allocate_bits

# ---- sensitivities ----------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _mse(model, x):
    return ((model(x) - torch.sin(x[:, :3] * 2)) ** 2).mean()


def _exact_hessian(model, x):
    """The joint Hessian of the loss over both weights (flattened, layer 0 then layer 2)."""
    w0, w2 = model[0].weight.detach(), model[2].weight.detach()
    n0 = w0.numel()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(flat):
        p = dict(params, **{"0.weight": flat[:n0].view_as(w0), "2.weight": flat[n0:].view_as(w2)})
        return _mse(lambda inp: functional_call(model, p, (inp,)), x)

    return torch.autograd.functional.hessian(f, torch.cat([w0.flatten(), w2.flatten()])), n0


def test_hutchinson_matches_exact_hessian_trace():
    model, x = _mlp(), torch.randn(32, 5, dtype=torch.float64, generator=torch.Generator()
                                   .manual_seed(1))
    H, n0 = _exact_hessian(model, x)
    n = 3000
    est = mp.hessian_trace(model, [x], ["0", "2"], n_probes=n, seed=3, loss_fn=_mse,
                           batch_size=64)
    for name, sl in (("0", slice(0, n0)), ("2", slice(n0, None))):
        exact = float(torch.diagonal(H)[sl].sum())
        # Rademacher variance of v_l^T (H v)_l: 4 H_ij^2 per pair inside l, H_ij^2 across
        inside = H[sl, sl] - torch.diag(torch.diagonal(H)[sl])
        mask = torch.ones(H.shape[0], dtype=torch.bool)
        mask[sl] = False
        var = float(2 * (inside ** 2).sum() + (H[sl][:, mask] ** 2).sum())
        tol = 4 * math.sqrt(var / n)
        assert abs(est[name] - exact) < tol, (name, est[name], exact, tol)
        assert abs(est[name] - exact) < 0.1 * abs(exact), (name, est[name], exact)
    again = mp.hessian_trace(model, [x], ["0", "2"], n_probes=n, seed=3, loss_fn=_mse,
                             batch_size=64)
    assert again == est  # seeded
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_fisher_matches_per_sample_gradients():
    model = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = mp.fisher_diagonal(model, [x], ["0", "2"], loss_fn=_mse)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, row):
        return _mse(lambda inp: functional_call(model, p, (inp,)), row.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0))(params, x)
    for name in ("0", "2"):
        ref = (g[f"{name}.weight"] ** 2).mean(0)
        torch.testing.assert_close(got[name], ref, rtol=1e-10, atol=1e-14)


# ---- allocation -------------------------------------------------------------------------------

CHOICES = (2, 3, 4, 8, None)


def _instance(seed: int, n_layers: int = 6):
    rng = np.random.default_rng(seed)
    sizes = {f"l{i}": int(rng.integers(1, 40)) * 32 for i in range(n_layers)}
    costs = {}
    for n in sizes:
        s = float(rng.lognormal(0, 2))
        costs[n] = {b: s * 4.0 ** -b * float(rng.uniform(0.5, 1.5)) for b in (2, 3, 4, 8)}
    return sizes, costs


def _brute(sizes, bits_of, cost_of, budget, choices=CHOICES):
    """min total cost over every assignment with sum(size * bits) <= budget * sum(size)."""
    names = list(sizes)
    total = sum(sizes.values())
    best = (math.inf, None)
    for combo in itertools.product(choices, repeat=len(names)):
        used = sum(sizes[n] * bits_of(n, c) for n, c in zip(names, combo))
        if used <= budget * total + 1e-9:
            c = sum(cost_of(n, b) for n, b in zip(names, combo))
            if c < best[0]:
                best = (c, combo)
    return best


def _obj(costs, over):
    return sum(0.0 if v is None else costs[n][v["bits"]] for n, v in over.items())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knapsack_is_exact_against_brute_force(seed):
    sizes, costs = _instance(seed)
    for budget in (2.0, 2.4, 3.0, 3.7, 5.0, 9.0, 15.9):
        over = allocate_bits(costs, budget, sizes=sizes)
        ref, _ = _brute(sizes, lambda n, c: 16 if c is None else c,
                        lambda n, b: 0.0 if b is None else costs[n][b], budget)
        assert _obj(costs, over) == pytest.approx(ref, rel=1e-12, abs=1e-300), budget
        assert mp.average_bits(costs, over, sizes=sizes) <= budget + 1e-12


def test_knapsack_real_bits_per_weight_and_float32():
    """LayerSensitivity entries count their measured bits per weight (scales included)."""
    sizes, costs = _instance(5, 5)
    bpw = {2: 2.53125, 3: 3.546875, 4: 4.5625, 8: 8.125}
    sens = {n: LayerSensitivity(sizes[n], 1.0, costs[n], bpw) for n in sizes}
    for budget in (2.6, 3.3, 4.0, 6.0, 12.0):
        over = allocate_bits(sens, budget, float_bits=32)
        ref, _ = _brute(sizes, lambda n, c: 32 if c is None else bpw[c],
                        lambda n, b: 0.0 if b is None else costs[n][b], budget)
        assert _obj(costs, over) == pytest.approx(ref, rel=1e-12, abs=1e-300), budget
        assert mp.average_bits(sens, over, float_bits=32) <= budget + 1e-12
    # a coarse grid (max_states) stays within the budget
    coarse = allocate_bits(sens, 3.3, max_states=50)
    assert mp.average_bits(sens, coarse) <= 3.3 + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_greedy_never_exceeds_budget(seed):
    sizes, costs = _instance(seed, 8)
    for budget in np.linspace(2.0, 16.0, 23):
        g = allocate_bits(costs, float(budget), sizes=sizes, method="greedy")
        k = allocate_bits(costs, float(budget), sizes=sizes)
        assert mp.average_bits(costs, g, sizes=sizes) <= budget + 1e-12
        assert _obj(costs, g) >= _obj(costs, k) - 1e-12 * max(1.0, _obj(costs, k))


# ---- end to end on a tiny Llama ---------------------------------------------------------------


def test_overrides_quantize_the_intended_layers():
    model = build("llama")
    cal = calibration(4, 32)
    cfg = qkern.RTNConfig(bits=4, group_size=32, sym=False)
    sens = mp.sensitivity(model, cal, method="kl", bits=(2, 3, 4, 8), config=cfg)
    assert len(sens) == 14 and all(s.cost[2] > s.cost[8] for s in sens.values())
    over = allocate_bits(sens, 3.6)
    # force every choice to appear, so each kind of override is built
    names = list(over)
    over[names[0]], over[names[1]] = None, sens[names[1]].override[8]
    over[names[2]], over[names[3]] = {"bits": 2}, {"bits": 3}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q = qkern.quantize_model(model, mp.mixed_config(cfg, over), cal)
    assert not [x for x in w if "left in float" in str(x.message)]  # nothing skipped
    for n, v in over.items():
        m = q.get_submodule(n)
        if v is None:
            assert type(m) is nn.Linear, n
            continue
        b = v["bits"]
        assert m.weight_q.format.name == f"int{b}", (n, m.weight_q.format.name)
        assert (m.weight_q.zero_point is None) == (b == 8), n  # int8: sym per channel
        assert m.weight_q.bits_per_element == pytest.approx(sens[n].bits_per_weight[b])
    hutch = mp.sensitivity(model, cal, method="hutchinson", n_probes=2, config=cfg)
    fish = mp.sensitivity(model, cal, method="fisher", config=cfg)
    assert list(hutch) == list(fish) == list(sens)
    assert all(math.isfinite(v.score) and v.cost[2] >= v.cost[4] >= v.cost[8] >= 0
               for v in hutch.values())  # a negative trace estimate predicts no increase
    assert all(v.score > 0 and v.cost[2] > v.cost[4] > v.cost[8] > 0 for v in fish.values())


# ---- errors -----------------------------------------------------------------------------------


def test_bad_arguments():
    sizes, costs = _instance(0, 3)
    with pytest.raises(ValueError, match="below the smallest allocation"):
        allocate_bits(costs, 1.9, sizes=sizes)
    for bad in (0, -1.0, math.nan, math.inf, True, "3"):
        with pytest.raises(ValueError, match="budget"):
            allocate_bits(costs, bad, sizes=sizes)
    with pytest.raises(ValueError, match="unknown allocation method"):
        allocate_bits(costs, 3.0, sizes=sizes, method="ilp")
    with pytest.raises(ValueError, match="choices"):
        allocate_bits(costs, 3.0, sizes=sizes, choices=(1, 4))
    with pytest.raises(ValueError, match="choices"):
        allocate_bits(costs, 3.0, sizes=sizes, choices=())
    with pytest.raises(ValueError, match="no predicted increase for 5 bits"):
        allocate_bits(costs, 3.0, sizes=sizes, choices=(2, 5))
    with pytest.raises(ValueError, match="sizes"):
        allocate_bits(costs, 3.0)
    with pytest.raises(ValueError, match="float_bits"):
        allocate_bits(costs, 3.0, sizes=sizes, float_bits=8)
    with pytest.raises(ValueError, match="non-empty"):
        allocate_bits({}, 3.0)
    model, cal = build("llama"), calibration(2, 16)
    with pytest.raises(ValueError, match="unknown sensitivity method"):
        mp.sensitivity(model, cal, method="hessian")
    with pytest.raises(ValueError, match="bits"):
        mp.sensitivity(model, cal, bits=(1, 4))
    with pytest.raises(TypeError, match="LLM method config"):
        mp.sensitivity(model, cal, config=qkern.WeightOnlyConfig())
    with pytest.raises(TypeError, match="calibration"):
        mp.sensitivity(model, torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        mp.sensitivity(model, [])
    with pytest.raises(ValueError, match="n_probes"):
        mp.hessian_trace(model, cal, ["model.layers.0.mlp.up_proj"], n_probes=0)
    with pytest.raises(ValueError, match="not a module"):
        mp.hessian_trace(model, cal, ["model.layers.9.mlp.up_proj"])
    with pytest.raises(TypeError, match="config"):
        mp.mixed_config("RTN", {})


def test_pipeline_checks_each_overridden_layer_not_only_block_0():
    """int8 with zero points has no fused kernel: the layer that asks for it stays float, and
    the same layer of another block, at 4 bits, is still quantized."""
    model, cal = build("llama"), calibration(2, 16)
    cfg = qkern.RTNConfig(bits=4, group_size=32, sym=False,
                          overrides={"model.layers.0.self_attn.q_proj": {"bits": 8},
                                     "model.layers.1.mlp.up_proj": {"bits": 8}})
    with pytest.warns(UserWarning, match="left in float"):
        q = qkern.quantize_model(model, cfg, cal)
    assert type(q.get_submodule("model.layers.0.self_attn.q_proj")) is nn.Linear
    assert type(q.get_submodule("model.layers.1.mlp.up_proj")) is nn.Linear
    for n in ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"):
        assert q.get_submodule(n).weight_q.format.name == "int4", n
