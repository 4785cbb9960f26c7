"""qkern.mixed_choice: the chosen allocation is the candidate with the lowest calibration loss
(or KL to the float model) computed here independently in numpy from the quantized models'
logits; no candidate is over the budget (measured on the built layers' storage); every uniform
allocation that fits is among the candidates; misleading sensitivities are caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qkern
import qkern.mixed_choice as mc
from llm_models import build, calibration
from qkern import mixed_precision as mp
from qkern.mixed_choice import choose_allocation

CFG = qkern.RTNConfig(bits=4, group_size=32, sym=False)


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return (out if isinstance(out, torch.Tensor) else out.logits).double().numpy()


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _nll(model, cal):
    """Mean next-token negative log-likelihood over all predicted tokens, from the definition."""
    tot = n = 0.0
    for x in cal:
        lp = _log_softmax(_logits(model, x))[:, :-1]
        tgt = x[:, 1:].numpy()
        tot -= np.take_along_axis(lp, tgt[..., None], -1).sum()
        n += tgt.size
    return tot / n


def _kl(ref, model, cal):
    tot = n = 0.0
    for x in cal:
        lp, lq = _log_softmax(_logits(ref, x)), _log_softmax(_logits(model, x))
        tot += (np.exp(lp) * (lp - lq)).sum()
        n += lp.shape[0] * lp.shape[1]
    return tot / n


def _storage(q, layers):
    """Average bits per weight of the built layers (float layers at 16)."""
    tot = n = 0
    for name in layers:
        m = q.get_submodule(name)
        k = m.weight.numel() if type(m) is nn.Linear else m.in_features * m.out_features
        tot += k * (16 if type(m) is nn.Linear else m.weight_q.bits_per_element)
        n += k
    return tot / n


@pytest.fixture(scope="module")
def setup():
    model, cal = build("llama"), calibration(4, 32)
    sens = mp.sensitivity(model, cal, method="fisher", config=CFG)
    uni = {}
    for b in (2, 3, 4, 8, None):
        q = qkern.quantize_model(model, mp.mixed_config(CFG, mp.uniform(sens, b)))
        uni[b] = _storage(q, list(sens))
    return model, cal, sens, uni


def _check(pick, sens, model, cal, budget, uni, measure):
    layers = list(pick.overrides)
    rel = 1e-5 if measure == "loss" else 1e-3  # KL: float32 log-probability differences
    ref = {}
    for label, over in pick.candidates.items():
        q = qkern.quantize_model(model, mp.mixed_config(CFG, over))
        assert _storage(q, layers) <= budget + 1e-9, (label, budget)  # never over budget
        ref[label] = _nll(q, cal) if measure == "loss" else _kl(model, q, cal)
        assert pick.losses[label] == pytest.approx(ref[label], rel=rel, abs=1e-9), label
    best = min(ref.values())
    assert ref[pick.label] <= best + 2 * rel * abs(best) + 1e-9, (pick.label, ref)
    assert pick.overrides == pick.candidates[pick.label]
    assert pick.label in pick.losses and set(pick.losses) == set(pick.candidates)
    for b, avg in uni.items():  # every uniform allocation that fits was tried (once)
        fits = avg <= budget + 1e-9
        tried = sum(over == mp.uniform(sens, b) for over in pick.candidates.values())
        assert tried == int(fits), b


@pytest.mark.parametrize("budget", [3.3, 4.3, 5.2])
def test_chooser_keeps_the_lowest_measured_loss(setup, budget):
    model, cal, sens, uni = setup
    pick = choose_allocation(model, CFG, cal, budget, sens)
    assert "knapsack" in pick.candidates and len(pick.candidates) >= 2
    _check(pick, sens, model, cal, budget, uni, "loss")


def test_misleading_sensitivities_are_caught_by_measuring(setup):
    """Costs reversed (2 bits predicted free, 8 bits costly): the knapsack takes 2 bits
    everywhere; the measured KL prefers a uniform allocation with more bits."""
    model, cal, sens, uni = setup
    bad = {n: mp.LayerSensitivity(s.numel, s.score, {b: float(b) for b in s.cost},
                                  s.bits_per_weight, s.override) for n, s in sens.items()}
    budget = 5.2
    pick = choose_allocation(model, CFG, cal, budget, bad, choices=(2, 3, 4, 8), measure="kl")
    assert all(v["bits"] == 2 for v in pick.candidates["knapsack"].values())
    assert pick.label != "knapsack"
    _check(pick, bad, model, cal, budget, {b: v for b, v in uni.items() if b is not None}, "kl")


def test_cache_and_extra_candidates(setup, monkeypatch):
    model, cal, sens, _ = setup
    calls = []
    real = mc.quantize_model
    monkeypatch.setattr(mc, "quantize_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache: dict = {}
    one = choose_allocation(model, CFG, cal, 4.3, sens, cache=cache)
    n = len(calls)
    assert n == len(one.candidates) == len(cache)
    two = choose_allocation(model, CFG, cal, 4.3, sens, cache=cache)
    assert len(calls) == n and two.losses == one.losses and two.label == one.label
    # a caller's candidate within the budget is measured with the others
    mine = dict(mp.uniform(sens, 2))
    first = next(iter(mine))
    mine[first] = {"bits": 3}
    three = choose_allocation(model, CFG, cal, 4.3, sens, candidates={"mine": mine},
                              cache=cache)
    assert "mine" in three.losses and len(calls) == n + 1


def test_bad_arguments(setup):
    model, cal, sens, _ = setup
    with pytest.raises(ValueError, match="over the budget"):
        choose_allocation(model, CFG, cal, 4.3, sens, candidates={"f": mp.uniform(sens, None)})
    with pytest.raises(ValueError, match="every layer"):
        choose_allocation(model, CFG, cal, 4.3, sens, candidates={"x": {"a": {"bits": 2}}})
    with pytest.raises(ValueError, match="unknown measure"):
        choose_allocation(model, CFG, cal, 4.3, sens, measure="ppl")
    with pytest.raises(ValueError, match="below"):
        choose_allocation(model, CFG, cal, 4.3, sens, below=(-0.1,))
    with pytest.raises(ValueError, match="budget"):
        choose_allocation(model, CFG, cal, 1.0, sens)
    with pytest.raises(TypeError, match="calibration"):
        choose_allocation(model, CFG, torch.zeros(1, 8, dtype=torch.long), 4.3, sens)
    with pytest.raises(TypeError, match="LayerSensitivity"):
        choose_allocation(model, CFG, cal, 4.3, {n: dict(s.cost) for n, s in sens.items()})
    with pytest.raises(TypeError, match="config"):
        choose_allocation(model, "RTN", cal, 4.3, sens)
    with pytest.raises(ValueError, match="reference"):
        mc.measure_loss(model, cal, "kl")
