"""ZeroQuant (Yao et al. 2022): group-wise RTN weights + token-wise dynamic int8 activations
against an independent torch reference on tiny random Llama / OPT models (built from a config),
the per-token int8 kernel (act="int8_token"), and layer-by-layer knowledge distillation
lowering the block output error on the calibration data."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llm_models as LM
import qkern
from qkern.nn import QuantLinear
from qkern.ops import NonFiniteError
from qkern.quantization import ZeroQuantConfig, find_blocks
from qkern.quantization.blocks import block_linears
from qkern.quantization.sequential import block_outputs, capture_first_block_inputs
from reference import quantize_int


def ref_token_int8(x: torch.Tensor) -> torch.Tensor:
    """Token-wise symmetric int8 (ZeroQuant eq. 1 per row): s = max|x_row| / 127 (0 -> 1),
    x_q = clamp(round(x / s), -127, 127) * s, in float64."""
    xd = x.double()
    s = xd.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.clamp(torch.round(xd / s), -127, 127) * s).float()


class RefLinear(nn.Module):
    """y = Q_token(x) @ RTN(W)^T + b (the RTN weight from tests/reference.py)."""

    def __init__(self, lin: nn.Linear, bits: int, group: int | None, sym: bool = True):
        super().__init__()
        gran = ({"granularity": "group", "axis": 1, "group_size": group} if group
                else {"granularity": "channel", "axis": 0})
        *_, deq = quantize_int(lin.weight.detach().numpy(), f"int{bits}", symmetric=sym, **gran)
        self.w, self.b = torch.from_numpy(deq), lin.bias

    def forward(self, x):
        return F.linear(ref_token_int8(x), self.w, self.b)


def reference_model(model, bits, group):
    ref = copy.deepcopy(model)
    name, blocks = find_blocks(ref)
    for b in blocks:
        for rel in block_linears(b):
            parent, _, child = rel.rpartition(".")
            setattr(b.get_submodule(parent), child, RefLinear(b.get_submodule(rel), bits, group))
    return ref


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("bits,group,kernel", [(8, None, "w8a8"), (4, 32, "a8_token"),
                                               (8, 32, "a8_token")])
def test_without_lkd_equals_rtn_weights_and_token_int8(arch, bits, group, kernel):
    model = LM.build(arch)
    q = qkern.quantize_model(model, ZeroQuantConfig(bits=bits, group_size=group),
                             LM.calibration(2, 8), progress=False)
    name, blocks = find_blocks(model)  # the float model's block linears, found in q
    layers = [q.get_submodule(f"{name}.{i}.{r}") for i in range(len(blocks))
              for r in block_linears(blocks[i])]
    assert layers and all(isinstance(m, QuantLinear) and m.kernel == kernel for m in layers)
    assert type(q.get_input_embeddings()) is nn.Embedding
    ids = LM.calibration(1, 12, seed=5)[0]
    torch.testing.assert_close(LM.output(q, ids), LM.output(reference_model(model, bits, group),
                                                            ids), atol=3e-4, rtol=3e-4)


def _block0_error(model, q, batches) -> float:
    name, fb = find_blocks(model)
    inputs = capture_first_block_inputs(model, fb[0], batches)
    ref, got = block_outputs(fb[0], inputs), block_outputs(q.get_submodule(f"{name}.0"), inputs)
    return float(sum(((a - b) ** 2).mean() for a, b in zip(ref, got)))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_lkd_lowers_the_block_output_error(arch):
    model = LM.build(arch)
    cal = LM.calibration(2, 16)
    plain = qkern.quantize_model(model, ZeroQuantConfig(bits=4, group_size=32), cal,
                                 progress=False)
    cfg = ZeroQuantConfig(bits=4, group_size=32, lkd=True, lkd_steps=20, lkd_lr=3e-5)
    quantizer = qkern.quantization.quantizer_for(cfg)
    lkd = qkern.quantization.quantize_sequential(model, quantizer, cal, progress=False)
    e_plain, e_lkd = _block0_error(model, plain, cal), _block0_error(model, lkd, cal)
    assert e_lkd < 0.8 * e_plain, (e_lkd, e_plain)
    # every block's distilled output error (fake quantization, as trained) went down
    assert len(quantizer.lkd_losses) == 2
    assert all(after < before for before, after in quantizer.lkd_losses.values())
    # and the whole model's outputs on the calibration data are closer to the float model's
    out = [LM.output(model, b) for b in cal]
    err = {k: sum(float(((LM.output(m, b) - o) ** 2).mean()) for b, o in zip(cal, out))
           for k, m in (("plain", plain), ("lkd", lkd))}
    assert err["lkd"] < err["plain"], err


def test_config_checks_and_save_load(tmp_path):
    for bad in ({"bits": 3}, {"group_size": 0}, {"lkd": 1}, {"lkd_steps": 0},
                {"lkd_lr": -1.0}, {"lkd_lr": float("nan")}):
        with pytest.raises(ValueError, match=f"ZeroQuantConfig.{next(iter(bad))}"):
            ZeroQuantConfig(**bad)
    cfg = ZeroQuantConfig(bits=4, group_size=32)
    assert qkern.quantization.BaseConfig.from_json(cfg.to_json()) == cfg
    model = LM.build("llama")
    with pytest.raises(ValueError, match="needs calibration"):
        qkern.quantize_model(model, ZeroQuantConfig(lkd=True))
    q = qkern.quantize_model(model, cfg, progress=False)  # no data needed without LKD
    path = os.path.join(tmp_path, "zq.safetensors")
    qkern.save(q, path)
    r = qkern.load(path, lambda: LM.build("llama"))
    ids = LM.calibration(1, 10, seed=7)[0]
    assert torch.equal(LM.output(r, ids), LM.output(q, ids))


def test_int8_token_kernel():
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    ql = QuantLinear.from_float(lin, "int4", group_size=32, act="int8_token")
    assert ql.kernel == "a8_token" and ql.kernel_reason is None
    *_, deq = quantize_int(lin.weight.detach().numpy(), "int4", granularity="group", axis=1,
                           group_size=32)
    x = torch.randn(2, 3, 64)
    x[0, 1] = 0.0  # an all-zero token
    want = F.linear(ref_token_int8(x), torch.from_numpy(deq), lin.bias)
    torch.testing.assert_close(ql(x), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(ql.dequantize_weight().numpy(), deq)
    compiled = torch.compile(ql, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ql(x), atol=0, rtol=0)
    xg = x.clone().requires_grad_()
    ql(xg).sum().backward()  # straight-through: the gradient of x @ W^T
    torch.testing.assert_close(xg.grad, torch.ones(2, 3, 24) @ torch.from_numpy(deq),
                               atol=1e-5, rtol=1e-5)
    x[1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        ql(x)
