"""1-bit QAT on real images (sklearn's load_digits), each model converted to qkern's binary
kernels before it is scored: BinaryConnect and ABC-Net above PTQ binary weights, XNOR-Net
(binary weights and activations) far above chance."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from qkern.models import digits as D  # noqa: E402
from qkern.tools.reports import qat as R  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    data = D.load_data()
    return {k: D.train(k, data, epochs=15) for k in ("cnn", "cnn_bn")}, data


def _ptq(model, data):
    return D.accuracy(R.ptq_binary(model), data.x_test, data.y_test)


def test_binaryconnect_and_abc_beat_ptq_binary(trained):
    models, data = trained
    floor = _ptq(models["cnn_bn"], data)
    assert R.qat(models["cnn_bn"], data, "binaryconnect", 1, None, epochs=3) > floor + 0.2
    floor = _ptq(models["cnn"], data)
    assert R.qat(models["cnn"], data, "abc", 1, None, epochs=3) > max(floor + 0.2, 0.95)
    assert R.qat(models["cnn"], data, "abc", 1, 1, epochs=3) > 0.8


def test_xnor_w1a1(trained):
    models, data = trained
    acc = R.qat(models["cnn_bn"], data, "xnor", 1, 1, epochs=3, exclude=["0", "11"])
    assert acc > 0.8
