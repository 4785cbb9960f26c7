"""Model folders as transformers writes them: one ``model.safetensors``, shards with
``model.safetensors.index.json`` (``save_pretrained(max_shard_size=...)``), several
``.safetensors`` files, float16 / bfloat16 weights; through ``qkern.models.load_llama``
(qkern's own Llama) and ``qkern.models.load_pretrained`` (transformers).

References: the tensors as the ``safetensors`` package reads them from the files, and
transformers' own LlamaForCausalLM on the same folder.
"""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers", reason="writes the folders with transformers")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import llm_models as LM  # noqa: E402
from qkern.models import load_llama, load_pretrained  # noqa: E402
from qkern.models.assets import find_model  # noqa: E402
from qkern.models.llama import read_weights, weight_files  # noqa: E402
from qkern.tools.demo import load_model  # noqa: E402

IDS = torch.tensor([[1, 50, 7, 33, 90, 12, 64, 5]])


def _files(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def tiny():
    return LM.build("llama")


def _save(model, folder, dtype=None, shard=None):
    m = LM.build("llama") if dtype is not None else model
    if dtype is not None:
        m.load_state_dict(model.state_dict())
        m = m.to(dtype)
    m.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def test_sharded_folder_loads_like_transformers(tmp_path, tiny):
    d = _save(tiny, tmp_path / "sharded", shard="30KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (d / "model.safetensors").exists()
    m = load_llama(d)
    with torch.no_grad():
        assert torch.allclose(m(IDS), tiny(IDS).logits, rtol=0, atol=1e-5)
    sd = _files(d)
    for k, t in m.state_dict().items():
        if k in sd:
            assert torch.equal(t, sd[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_checkpoints_convert_exactly_to_float32(tmp_path, tiny, dtype):
    d = _save(tiny, tmp_path / str(dtype), dtype=dtype, shard="50KB")
    saved = _files(d)
    assert {t.dtype for t in saved.values()} == {dtype}
    m = load_llama(d)
    for k, t in m.state_dict().items():
        if k in saved:
            assert t.dtype == torch.float32 and torch.equal(t, saved[k].float()), k
    hf = load_pretrained(d)  # transformers, converted to float32 as well
    assert hf.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(m(IDS), hf(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_none_keeps_the_checkpoint_dtype(tmp_path, tiny, dtype):
    d = _save(tiny, tmp_path / "h", dtype=dtype)
    m = load_llama(d, dtype=None)
    assert {p.dtype for p in m.parameters()} == {dtype}
    assert m.rope_cos.dtype == torch.float32  # the angles stay exact
    with torch.no_grad():
        out = m(IDS)
        ref = load_llama(d)(IDS)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref, rtol=0, atol=0.05 if dtype == torch.bfloat16 else 0.01)
    assert m.generate(IDS[0], 4).shape == (4,)


def test_float32_to_float16_on_request(tmp_path, tiny):
    d = _save(tiny, tmp_path / "f")
    m = load_llama(d, dtype=torch.float16)
    w = load_file(d / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(m.model.layers[0].mlp.up_proj.weight, w.half())


def test_several_files_without_an_index(tmp_path, tiny):
    d = _save(tiny, tmp_path / "s")
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, d / "part-a.safetensors")
    save_file({k: sd[k] for k in keys[1::2]}, d / "part-b.safetensors")
    assert [f.name for f in weight_files(d)] == ["part-a.safetensors", "part-b.safetensors"]
    m = load_llama(d)
    with torch.no_grad():
        assert torch.allclose(m(IDS), tiny(IDS).logits, rtol=0, atol=1e-5)
    save_file({keys[0]: sd[keys[0]]}, d / "part-c.safetensors")
    with pytest.raises(ValueError, match="in another shard too"):
        read_weights(d)


def test_broken_folders(tmp_path, tiny):
    d = _save(tiny, tmp_path / "b", shard="30KB")
    first = sorted(d.glob("model-*.safetensors"))[0]
    first.rename(d / "moved.bin")
    with pytest.raises(FileNotFoundError, match="shards named by"):
        load_llama(d)
    (d / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a safetensors index"):
        load_llama(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_llama(empty)
    with pytest.raises(ValueError, match="dtype must be"):
        load_llama(d, dtype=torch.int8)


def test_mixed_dtypes_need_a_dtype(tmp_path, tiny):
    d = _save(tiny, tmp_path / "mix")
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].half()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mixes float dtypes"):
        load_llama(d, dtype=None)
    assert load_llama(d).model.norm.weight.dtype == torch.float32


def test_demo_finds_and_reads_a_sharded_folder(tmp_path, tiny):
    d = _save(tiny, tmp_path / "demo", shard="30KB")
    assert find_model(d) == d.resolve()
    m = load_model(d)
    sd = _files(d)
    assert set(m.tensors) == set(sd) and all(torch.equal(m.tensors[k], sd[k]) for k in sd)
