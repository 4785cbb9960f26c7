"""qkern.save / qkern.load of VQLinear layers (GPTVQ models): the loaded model computes what
the saved one did, bit for bit, and a file with bad VQ tensors raises BadFile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import llm_models as LM
import qkern
from qkern.io.safetensors import read_safetensors, write_safetensors
from qkern.io.serialization import BadFile
from qkern.quantization import VQConfig
from qkern.vq.linear import VQLinear


def test_gptvq_model_round_trips(tmp_path):
    model = LM.build("llama")
    cfg = VQConfig(bits=2, dim=2, group_rows=16, scale_group=64, kmeans_iters=3)
    q = qkern.quantize_model(copy.deepcopy(model), cfg, LM.calibration(), progress=False)
    path = tmp_path / "vq.safetensors"
    qkern.save(q, path)
    back = qkern.load(path, model)
    layers = [n for n, m in back.named_modules() if isinstance(m, VQLinear)]
    assert len(layers) == 14
    ids = LM.calibration()[0]
    with torch.no_grad():
        assert torch.equal(LM.output(back, ids), LM.output(q, ids))
    assert back.qkern_config == cfg


def _saved(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8))
    q = copy.deepcopy(model)
    q[0] = VQLinear(torch.randint(0, 16, (40, 12)).to(torch.uint8),
                    torch.randn(3, 16, 2).half(), torch.rand(40, 3).half(), q[0].bias, 16)
    path = tmp_path / "m.safetensors"
    qkern.save(q, path)
    x = torch.randn(2, 24)
    assert torch.equal(qkern.load(path, model)(x), q(x))
    return model, path


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.__setitem__("0.codes", torch.full((40, 12), 16, dtype=torch.uint8)),
     "codebook size"),
    (lambda t: t["0.codebooks"].__setitem__((0, 0, 0), float("nan")), "must be finite"),
    (lambda t: (t.__setitem__("0.codes", torch.zeros(40, 13, dtype=torch.uint8)),
                t.pop("0.scales")), r"hold a \(40, 26\) weight"),
    (lambda t: t.__setitem__("0.scales", torch.rand(40, 5).half()), "scales must be"),
    (lambda t: t.pop("0.codebooks"), "no codes / codebooks"),
])
def test_bad_vq_tensors_raise_badfile(tmp_path, edit, match):
    model, path = _saved(tmp_path)
    tensors, meta = read_safetensors(path, with_metadata=True)
    edit(tensors)
    write_safetensors(path, tensors, meta, overwrite=True)
    with pytest.raises(BadFile, match=match):
        qkern.load(path, model)


def test_lattice_layer_round_trips(tmp_path):
    from qkern.vq.lattice import lattice_codebook

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 24))
    book = torch.as_tensor(lattice_codebook("D4", 2, centered=True)).half().unsqueeze(0)
    q = copy.deepcopy(model)
    q[0] = VQLinear(torch.randint(0, 256, (24, 8)).to(torch.uint8), book,
                    (torch.rand(24, 1) + 0.5).half(), q[0].bias, 24, lattice="D4")
    path = tmp_path / "lattice.safetensors"
    qkern.save(q, path)
    back = qkern.load(path, model)
    assert back[0].lattice == "D4" and back[0].overhead_bits == 24 * 16
    x = torch.randn(3, 32)
    assert torch.equal(back(x), q(x))
