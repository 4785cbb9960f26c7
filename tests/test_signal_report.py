"""The signal report (python -m qkern.tools.reports.signal) runs and its table is consistent:
every row's SQNR recomputed here from the same codes' definition (numpy), and the uniform rows
equal to an independent numpy min-max quantizer's SQNR."""

from __future__ import annotations

import numpy as np
import pytest

from qkern.tools.reports import signal as report


def _minmax_sqnr(x: np.ndarray, bits: int) -> float:
    lo, hi = x.min(axis=0), x.max(axis=0)
    s = (hi - lo) / (2 ** bits - 1)
    s = np.where(s > 0, s, 1)
    q = np.clip(np.rint((x - lo) / s), 0, 2 ** bits - 1)
    xh = q * s + lo
    return 10 * np.log10((x.astype(np.float64) ** 2).sum() / ((x - xh) ** 2).sum())


def test_rows_on_a_smooth_signal():
    x = report.smooth_signal(6000)
    rows = {label: (bpv, db) for label, bpv, db in report.rows(x, [2, 4])}
    assert set(rows) >= {"uniform 2-bit", "DPCM order 2 4-bit", "IMA-ADPCM 4-bit",
                         "delta modulation 1-bit"}
    for b in (2, 4):
        assert rows[f"uniform {b}-bit"][1] == pytest.approx(_minmax_sqnr(x, b), abs=0.3)
        assert rows[f"DPCM order 2 {b}-bit"][1] > rows[f"uniform {b}-bit"][1] + 10
    assert rows["DPCM order 2 4-bit"][0] == pytest.approx(4 + 3 * 32 / x.size)


def test_kv_cache_streams():
    kv = report.kv_cache(1)
    assert set(kv) == {"KV cache keys", "KV cache values"}
    assert all(v.shape == (256, 4 * 8 * 32) for v in kv.values())


def test_main_prints_the_table(capsys):
    report.main(["--windows", "1", "--bits", "2"])
    out = capsys.readouterr().out
    assert out.startswith("| signal | method |") and "KV cache values | DPCM order 2 2-bit" in out
