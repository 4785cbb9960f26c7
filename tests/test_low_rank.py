"""Low-rank compensation (LoRC, LQ-LoRA) and LowRankCompensationConfig.

References: numpy's truncated SVD of the error ``W - Q`` where ``Q`` is the base method's own
quantized weight (the base config run alone), Frobenius norms computed in numpy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import qkern
from llm_models import build, calibration
from qkern.nn import CompensatedLinear, QuantLinear
from qkern.quantization import (
    BaseConfig,
    GPTQConfig,
    LowRankCompensationConfig,
    RTNConfig,
    WeightOnlyConfig,
)
from qkern.quantization.algorithms.low_rank import compensate, compensate_model
from qkern.tools.reports.decompose import block_bits
from qkern.tools.reports.llm_vq import gptq_bits


def _np_truncated(e: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(e.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def test_lorc_is_the_truncated_svd_of_the_error():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = QuantLinear.from_float(lin, "int3", group_size=32, symmetric=False)
    w, qd = lin.weight.detach().numpy(), q.dequantize_weight().numpy()
    res = compensate(lin.weight, q, rank=6)
    ref = qd + _np_truncated(w - qd, 6)
    np.testing.assert_allclose(res.layer.dequantize_weight().numpy(), ref, atol=1e-5)
    assert res.errors == [pytest.approx(float(np.linalg.norm(w - ref)), rel=1e-5)]
    x = torch.randn(5, 96)
    np.testing.assert_allclose(res.layer(x).detach().numpy(),
                               x.numpy() @ ref.T + lin.bias.detach().numpy(), atol=1e-4)
    assert res.layer.base is q  # the quantized layer itself is kept


def test_lq_lora_steps_lower_the_error_and_keep_the_best():
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 64)
    q = QuantLinear.from_float(lin, "int2", group_size=32, symmetric=False)
    res = _quiet(compensate, lin.weight, q, rank=8, iters=6)
    e = res.errors
    assert len(e) >= 2 and e[1] < e[0]  # an alternating step beats LoRC alone here
    kept = res.layer.dequantize_weight().numpy()
    got = float(np.linalg.norm(lin.weight.detach().numpy() - kept))
    assert got == pytest.approx(min(e), rel=1e-5)
    # it stops at the first step that does not lower the error; all before it decrease
    assert all(b < a for a, b in zip(e[:-2], e[1:-1]))
    # the re-quantized base stays on the same grid: int2 codes, groups of 32, zero points
    wq = res.layer.base.weight_q
    assert (wq.format.name, wq.group_size, wq.zero_point is not None) == ("int2", 32, True)


def test_int8_factors():
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 64)
    q = QuantLinear.from_float(lin, "int4", group_size=32)
    res = _quiet(compensate, lin.weight, q, rank=8, factor_fmt="int8")
    assert isinstance(res.layer.side.up, QuantLinear)
    flt = compensate(lin.weight, q, rank=8)
    assert res.errors[0] == pytest.approx(flt.errors[0], rel=0.02)
    assert res.errors[0] < float(np.linalg.norm(lin.weight.detach().numpy() -
                                                q.dequantize_weight().numpy()))


def test_config_on_a_float_model_matches_the_base_plus_svd():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    base = WeightOnlyConfig(fmt="int4", group_size=32)
    alone = qkern.quantize_model(m, base)
    cfg = LowRankCompensationConfig(base=base, rank=4, overrides={"2": {"rank": 2}})
    q = qkern.quantize_model(m, cfg)
    for i, r in ((0, 4), (2, 2)):
        assert isinstance(q[i], CompensatedLinear) and q[i].side.rank == r
        w, qd = m[i].weight.detach().numpy(), alone[i].dequantize_weight().numpy()
        np.testing.assert_allclose(q[i].dequantize_weight().numpy(),
                                   qd + _np_truncated(w - qd, r), atol=1e-5)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert float((q(x) - m(x)).norm()) < float((alone(x) - m(x)).norm())
    assert q.qkern_config == cfg


def test_compensate_model_after_the_fact():
    torch.manual_seed(3)
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    alone = qkern.quantize_model(m, WeightOnlyConfig(fmt="int4", group_size=32,
                                                     exclude=["2"]))
    q, errors = compensate_model(alone, m, rank=5)
    assert isinstance(alone[0], QuantLinear)  # a copy: the quantized model is untouched
    assert list(errors) == ["0"] and type(q[2]) is torch.nn.Linear
    w, qd = m[0].weight.detach().numpy(), alone[0].dequantize_weight().numpy()
    np.testing.assert_allclose(q[0].dequantize_weight().numpy(), qd + _np_truncated(w - qd, 5),
                               atol=1e-5)


def test_gptq_base_in_the_llm_pipeline():
    model, cal = build("llama"), calibration(4, 16)
    base = GPTQConfig(bits=3, group_size=32)
    alone = _quiet(qkern.quantize_model, model, base, cal, progress=False)
    q = _quiet(qkern.quantize_model, model,
               LowRankCompensationConfig(base=base, rank=8), cal, progress=False)
    comp = {n: m for n, m in q.named_modules() if isinstance(m, CompensatedLinear)}
    n_lin = sum(isinstance(m, QuantLinear) for m in alone.modules())
    assert len(comp) == n_lin == 14
    # block 0's first true-sequential group (q, k, v) sees the same inputs with or without
    # compensation: its GPTQ weights agree; later layers calibrate on compensated outputs
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        np.testing.assert_allclose(comp[name].base.dequantize_weight().numpy(),
                                   alone.get_submodule(name).dequantize_weight().numpy(),
                                   atol=1e-6)
    for name, c in comp.items():
        w = model.get_submodule(name).weight.detach().numpy()
        qd = c.base.dequantize_weight().numpy()
        np.testing.assert_allclose(c.dequantize_weight().numpy(),
                                   qd + _np_truncated(w - qd, 8), atol=1e-5)
    ids = calibration(2, 24, seed=7)
    with torch.no_grad():
        ref = [model(i).logits for i in ids]
        d_alone = sum(float((alone(i).logits - r).norm()) for i, r in zip(ids, ref))
        d_comp = sum(float((q(i).logits - r).norm()) for i, r in zip(ids, ref))
    assert d_comp < d_alone


def test_config_json_and_bad_fields():
    cfg = LowRankCompensationConfig(base=GPTQConfig(bits=3, group_size=64), rank=16, iters=2,
                                    factor_fmt="int8")
    assert BaseConfig.from_json(cfg.to_json()) == cfg
    assert isinstance(LowRankCompensationConfig().base, RTNConfig)
    assert LowRankCompensationConfig(overrides={"x": "int8"}).for_layer("x").factor_fmt == "int8"
    for kw, what in ((dict(rank=0), "rank"), (dict(iters=-1), "iters"),
                     (dict(base="gptq"), "base"), (dict(factor_fmt="int99"), "factor_fmt"),
                     (dict(base=LowRankCompensationConfig()), "base")):
        with pytest.raises(ValueError, match=what):
            LowRankCompensationConfig(**kw)
    with pytest.raises(TypeError, match="QuantLinear"):
        compensate(torch.randn(4, 4), torch.nn.Linear(4, 4), 2)
    lin = torch.nn.Linear(32, 8)
    with pytest.raises(ValueError, match="weight is"):
        compensate(torch.randn(8, 16), QuantLinear.from_float(lin, "int8", group_size=None), 2)


def test_save_and_load_keep_low_rank_layers(tmp_path):
    """qkern.save stores CompensatedLinear (tests/test_save_extras.py has the real models)."""
    m = torch.nn.Sequential(torch.nn.Linear(64, 32))
    q = qkern.quantize_model(m, LowRankCompensationConfig(base=WeightOnlyConfig(group_size=32),
                                                          rank=2))
    qkern.save(q, tmp_path / "q.safetensors")
    back = qkern.load(tmp_path / "q.safetensors", torch.nn.Sequential(torch.nn.Linear(64, 32)))
    x = torch.randn(3, 64)
    assert torch.equal(back(x), q(x))


def test_report_counts_bits_as_the_vq_report_counts_gptq():
    model = build("llama")
    rtn = RTNConfig(bits=3, group_size=64, sym=False)
    alone = _quiet(qkern.quantize_model, model, rtn, progress=False)
    assert block_bits(alone) == gptq_bits(model, 3, 64)
    q, _ = compensate_model(alone, model, rank=8)
    extra = sum(16 * 8 * (m.in_features + m.out_features) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert block_bits(q) == (gptq_bits(model, 3, 64)[0] + extra, gptq_bits(model, 3, 64)[1])


def _np_weighted_best(e: np.ndarray, x: np.ndarray, damp: float, r: int) -> np.ndarray:
    """argmin over rank-r M of ||(E - M) X^T||^2 / N + d ||E - M||^2, d = damp * mean(diag(
    X^T X / N)), from the definition: with A = [X^T / sqrt(N), sqrt(d) I] = P Sig Q^T (thin
    SVD, P Sig invertible) the objective is ||(E - M) P Sig||^2, M P Sig ranges over the
    rank-r matrices, so M = SVD_r(E P Sig) (P Sig)^{-1} (Eckart-Young)."""
    n, k = x.shape
    d = damp * np.mean(np.sum(x.astype(np.float64) ** 2, 0) / n)
    a = np.hstack([x.T.astype(np.float64) / np.sqrt(n), np.sqrt(d) * np.eye(k)])
    p, sig, _ = np.linalg.svd(a, full_matrices=False)
    ps = p * sig
    return _np_truncated(e @ ps, r) @ np.linalg.inv(ps)


def _objective(e, m, x):
    return float(np.linalg.norm((e - m) @ x.T.astype(np.float64)))


def test_weighted_lorc_minimises_the_output_error():
    from qkern.decompose import weighted_svd_factors
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 24)
    # correlated inputs of uneven scale: the weighted and plain fits differ
    x = (torch.randn(300, 64) @ torch.randn(64, 64)) * torch.linspace(0.1, 3, 64)
    gram = (x.double().T @ x.double()) / x.shape[0]
    q = QuantLinear.from_float(lin, "int3", group_size=32, symmetric=False)
    w, qd, xn = lin.weight.detach().numpy(), q.dequantize_weight().numpy(), x.numpy()
    e = w.astype(np.float64) - qd
    for damp in (0.0, 0.01):
        ref = _np_weighted_best(e, xn, damp, 5)
        left, right = weighted_svd_factors(torch.from_numpy(e), gram, 5, damp)
        np.testing.assert_allclose((left @ right).numpy(), ref, rtol=1e-4,
                                   atol=1e-5 * np.abs(ref).max())
    ref = _np_weighted_best(e, xn, 0.0, 5)
    # it beats the plain SVD of the error on the inputs (and the plain SVD wins in weights)
    plain = _np_truncated(e, 5)
    assert _objective(e, ref, xn) < 0.97 * _objective(e, plain, xn)
    assert np.linalg.norm(e - plain) < np.linalg.norm(e - ref)
    res = compensate(lin.weight, q, rank=5, gram=gram, damp=0.0)
    np.testing.assert_allclose(res.layer.dequantize_weight().numpy(), qd + ref, rtol=1e-4,
                               atol=1e-4)
    # the recorded error is ||(W - Q - L R) S||_F, S S = gram: ||(.) X^T|| / sqrt(N)
    assert res.errors[0] == pytest.approx(_objective(e, ref, xn) / np.sqrt(300), rel=1e-4)
    res2 = _quiet(compensate, lin.weight, q, rank=5, iters=3, gram=gram)
    assert res2.errors[0] >= min(res2.errors) and len(res2.errors) >= 2
    with pytest.raises(ValueError, match="gram"):
        compensate(lin.weight, q, rank=5, gram=torch.eye(7))
    with pytest.raises(ValueError, match="positive definite"):
        compensate(lin.weight, q, rank=5, gram=torch.zeros(64, 64), damp=0.0)
    with pytest.raises(ValueError, match="damp"):
        compensate(lin.weight, q, rank=5, gram=gram, damp=-1.0)


def test_weighted_config_in_the_llm_pipeline():
    model, cal = build("llama"), calibration(4, 16)
    base = RTNConfig(bits=3, group_size=32, sym=False)
    cfg = LowRankCompensationConfig(base=base, rank=4, weighted=True)
    assert BaseConfig.from_json(cfg.to_json()) == cfg
    q = _quiet(qkern.quantize_model, model, cfg, cal, progress=False)
    # block 0's q_proj sees the float model's inputs: the reference fits on them
    name = "model.layers.0.self_attn.q_proj"
    seen = []
    lin = model.get_submodule(name)
    h = lin.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for c in cal:
            model(c)
    h.remove()
    x = torch.cat(seen).numpy()
    c = q.get_submodule(name)
    assert isinstance(c, CompensatedLinear)
    w = lin.weight.detach().numpy().astype(np.float64)
    qd = c.base.dequantize_weight().numpy()
    np.testing.assert_allclose(c.dequantize_weight().numpy(),
                               qd + _np_weighted_best(w - qd, x, 0.01, 4), atol=1e-4)
    # the RTN base is unchanged by the Grams it did not ask for
    alone = _quiet(qkern.quantize_model, model, base, cal, progress=False)
    np.testing.assert_array_equal(qd, alone.get_submodule(name).dequantize_weight().numpy())
    with pytest.raises(ValueError, match="weighted"):
        qkern.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 32)),
                             LowRankCompensationConfig(base=WeightOnlyConfig(group_size=32),
                                                       weighted=True), [torch.randn(4, 64)])
    with pytest.raises(ValueError, match="weighted"):
        LowRankCompensationConfig(weighted=1)
