"""quantize_model(inplace=False) of a sequential method shares the linears' float weights with
the user's model while it works (no block copied whole) and still returns a model that shares
no tensor with it, leaves it untouched, and equals an independent reference: each quantized
layer is ``QuantLinear.from_float`` of the user's float layer with RTN's options."""

from __future__ import annotations

import warnings

import torch

import qkern
from qkern.models import Llama
from qkern.models.llama import LlamaConfig
from qkern.nn import QuantLinear

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _storages(m) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())
            if t.numel()}


def test_rtn_result_shares_nothing_leaves_the_model_and_equals_from_float():
    torch.manual_seed(0)
    model = Llama(CFG).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = qkern.RTNConfig(bits=4, group_size=32, exclude=["*down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qkern.quantize_model(model, cfg, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not _storages(q) & _storages(model)
    n = 0
    for name, mod in q.named_modules():
        if name.endswith("down_proj"):  # left float: equal values, its own tensor
            assert type(mod) is torch.nn.Linear
            assert torch.equal(mod.weight, model.get_submodule(name).weight)
        elif isinstance(mod, QuantLinear):
            ref = QuantLinear.from_float(model.get_submodule(name), "int4", group_size=32)
            got, want = mod.state_dict(), ref.state_dict()
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
            n += 1
    assert n == 2 * 6
