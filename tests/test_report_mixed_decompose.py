"""The GPTQ options of the mixed-precision report and the LQ-LoRA / weighted / SVD rows of
the decompose report, on a tiny byte-level Llama (the shipped text, a few windows).

References: a fresh ``choose_allocation`` without the report's pre-filled cache (its own
quantization and measurement of every candidate), the number of distinct candidate
allocations counted from ``candidate_allocations``, and bytes counted as the VQ report counts
GPTQ (``gptq_bits``) plus 16-bit factors by hand."""

from __future__ import annotations

import pytest
import torch

import qkern.tools.reports.decompose as dec
import qkern.tools.reports.mixed_precision as mpr
from qkern import mixed_choice
from qkern.models import Llama, LlamaConfig
from qkern.nn import CompensatedLinear
from qkern.tools.reports.llm import wikitext_bytes
from qkern.tools.reports.llm_vq import gptq_bits


def _tiny() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=256)).eval()


@pytest.fixture
def tiny(monkeypatch):
    model = _tiny()
    valid, test = wikitext_bytes()
    texts = (valid[:6 * 256], test[:3 * 256])
    for mod in (mpr, dec):
        monkeypatch.setattr(mod, "load_llama", lambda path: model)
        monkeypatch.setattr(mod, "wikitext_bytes", lambda: texts)
    return model


def test_gptq_pareto_quantizes_each_allocation_once_and_matches_a_fresh_choice(tiny,
                                                                                monkeypatch):
    calls, distinct = [], set()
    real_q, real_choose, real_cands = mpr.quantize_model, mpr.choose_allocation, \
        mpr.candidate_allocations

    def count_q(model, cfg, *a, **kw):
        calls.append(mixed_choice.allocation_key(cfg.overrides))
        return real_q(model, cfg, *a, **kw)

    def cands(*a, **kw):
        out = real_cands(*a, **kw)
        distinct.update(mixed_choice.allocation_key(o) for o in out.values())
        return out

    def check(model, config, cal, budget, sens, choices, below, **kw):
        pick = real_choose(model, config, cal, budget, sens, choices, below, **kw)
        fresh = real_choose(model, config, cal, budget, sens, choices, below,
                            quant_calibration=kw["quant_calibration"])  # no cache
        assert fresh.label == pick.label and set(fresh.losses) == set(pick.losses)
        for k, v in fresh.losses.items():
            assert pick.losses[k] == pytest.approx(v, rel=1e-5)
        return pick

    monkeypatch.setattr(mpr, "quantize_model", count_q)
    monkeypatch.setattr(mpr, "candidate_allocations", cands)
    monkeypatch.setattr(mpr, "choose_allocation", check)
    text, points = mpr.pareto_table(["u2", "3", "u3"], ["fisher"], n_cal=2, algo="gptq",
                                    choices=(2, 3, 4, 8), below=(0.05,), quant_cal=2)
    assert "GPTQ g64" in text and "knapsack over {2, 3, 4, 8}" in text
    assert "GPTQ calibrated on 2 x 256 bytes" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(rows) == 3
    # every allocation met (the candidates, and uniform w2..w8) quantized exactly once by
    # the report itself (choose_allocation reads its cache); float is never among the choices
    assert len(calls) == len(set(calls))
    assert distinct <= set(calls)
    assert all(len({v for _, v in k}) == 1 for k in set(calls) - distinct)  # uniform ones
    assert len(set(calls) - distinct) <= 4
    assert not any(v is None for k in calls for _, v in k)
    # uniform allocations quantized only as needed: w2 (below 3), w3 (above 3, at u3), w4
    assert len(points["uniform"]) == 3 and len(points["verified (fisher)"]) == 3
    # the u3 budget (bits from the sensitivities) is the built w3 model's measured average
    u3 = rows[2].split(" | ")
    assert u3[0] == "| " + u3[3].split("(")[1].split(" b)")[0] and u3[3].startswith("w3:")


@pytest.mark.parametrize("argv, what", [(["--choices", "2,9"], "choices"),
                                        (["--choices", "2,x"], "choices"),
                                        (["--below", "-0.1"], "below"),
                                        (["--gptq-cal", "0"], "gptq-cal")])
def test_mixed_report_bad_options(argv, what, capsys):
    with pytest.raises(SystemExit):
        mpr.main(argv)
    assert what in capsys.readouterr().err


def test_decompose_rows_lqlora_weighted_svd(tiny, monkeypatch):
    built = {}
    real = dec.quantize

    def keep(model, cfg, cal):
        q, s = real(model, cfg, cal)
        built[(getattr(cfg, "iters", None), getattr(cfg, "weighted", None),
               getattr(cfg, "rank", None))] = q
        return q, s

    monkeypatch.setattr(dec, "quantize", keep)
    lines = list(dec.bytelm_rows(n_cal=2, rows=("lqlora", "weighted", "svd")))
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in lines if ln.startswith("| ")}
    labels = list(rows)
    assert "GPTQ w3 g64" in labels
    for lab in ("LQ-LoRA r8 (2 steps)", "LQ-LoRA r16 (2 steps)",
                "weighted LoRC r8 (fit to the inputs)", "weighted LoRC r16 (fit to the inputs)",
                "LoRC r8", "LoRC r16"):
        assert f"GPTQ w3 g64 + {lab} (config, in the pipeline)" in labels
    assert sum(lab.startswith("quantized SVD") for lab in labels) == 3
    assert not any("LoRC r4" in lab for lab in labels)  # the base group was not asked for
    # bytes: codes + float16 scales + zero points (as the VQ report counts GPTQ) + factors
    bits, n = gptq_bits(tiny, 3, 64)
    assert int(rows["GPTQ w3 g64"][3]) == bits // 8
    lin = [m for name, m in tiny.named_modules()
           if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"]
    for r in (8, 16):
        extra = sum(16 * r * (m.in_features + m.out_features) for m in lin)
        lab = f"GPTQ w3 g64 + weighted LoRC r{r} (fit to the inputs) (config, in the pipeline)"
        assert int(rows[lab][3]) == (bits + extra) // 8
        assert float(rows[lab][2]) == pytest.approx((bits + extra) / n, abs=1e-3)
    assert int(rows["fp32"][3]) == 4 * n
    q, plain = built[(0, True, 8)], built[(0, False, 8)]
    assert sum(isinstance(m, CompensatedLinear) for m in q.modules()) == len(lin)
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(q.get_submodule(name).side.dequantize_weight(),
                           plain.get_submodule(name).side.dequantize_weight())
    with pytest.raises(ValueError, match="row groups"):
        list(dec.bytelm_rows(rows=("nope",)))
    with pytest.raises(SystemExit):
        dec.main(["--rows", "nope", "--no-digits"])
