"""collect_grams in float32 (the sequential pipeline's error report for methods without Gram
matrices) agrees with the float64 accumulation, and RTN's reported errors with the float64
formula."""

from __future__ import annotations

import torch

import llm_models as LM
import qkern
from qkern.quantization import RTNConfig, find_blocks
from qkern.quantization.calibration import collect_grams
from qkern.quantization.sequential import relative_output_error


def test_float32_gram_matches_float64():
    model = LM.build("llama")
    cal = LM.calibration(4, 32)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    g64 = collect_grams(model, names, cal)
    g32 = collect_grams(model, names, cal, torch.float32)
    for n in names:
        assert g32[n].dtype == torch.float32 and g64[n].dtype == torch.float64
        torch.testing.assert_close(g32[n].double(), g64[n], rtol=1e-5, atol=1e-6)


def test_rtn_reported_error_is_the_float64_output_error():
    model = LM.build("llama")
    cal = LM.calibration(4, 32)
    q = qkern.quantize_model(model, RTNConfig(bits=4, group_size=32), cal)
    blk0 = find_blocks(model)[1][0]
    name = "model.layers.0.self_attn.q_proj"
    g = collect_grams(model, [name], cal)[name]  # block 0's input is the float model's
    want = relative_output_error(blk0.self_attn.q_proj.weight.detach(),
                                 q.get_submodule(name).dequantize_weight(), g)
    got = next(r.error for r in q.qkern_report if r.name == name)
    assert abs(got - want) <= 1e-4 * want, (got, want)
