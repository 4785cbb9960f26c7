"""QAT on real images (sklearn's load_digits): LSQ at W4A4 within 1 % of the float CNN,
every QAT method (DoReFa included) at W2A2 above PTQ at W2A2 (the issue's targets), TTQ above
it too and INQ 5-bit near float, each QAT model converted to qkern's kernels before it is
scored."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from qkern.models import digits as D  # noqa: E402
from qkern.tools.reports import qat as R  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    data = D.load_data()
    model = D.train("cnn", data, epochs=15)
    return model, data, D.accuracy(model, data.x_test, data.y_test)


def test_lsq_w4a4_within_one_percent_of_float(trained):
    model, data, base = trained
    assert base > 0.97
    assert R.qat(model, data, "lsq", 4, 4, epochs=6) >= base - 0.01


def test_every_qat_method_beats_ptq_at_w2a2(trained):
    model, data, _ = trained
    floor = R.ptq(model, data, 2)
    for method in R.METHODS:
        acc = R.qat(model, data, method, 2, 2, epochs=3)
        assert acc > floor + 0.2, (method, acc, floor)


def test_ttq_and_inq_beat_ptq_at_low_bits(trained):
    """TTQ (ternary, weight-only) above 2-bit PTQ; INQ 5-bit with 4-bit activations within
    2 % of float (the paper's 5-bit INQ is lossless on ImageNet)."""
    model, data, base = trained
    floor = R.ptq(model, data, 2)
    assert R.qat(model, data, "ttq", 2, None, epochs=3) > floor + 0.2
    assert R.qat(model, data, "inq", 5, 4, epochs=3) >= base - 0.02
