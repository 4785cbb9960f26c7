"""qkern.quantize_pretrained (docs/streaming.md) against the in-memory pipeline: the same
checkpoint quantized by ``quantize_model`` and written by ``qkern.export(format="qkern")``
is the reference; the streamed folder must hold the same tensors bit for bit, the same
quantization_config, and load to a model with the same outputs. Resume (a run stopped after
block k), offloaded activations and bad input are checked against the same reference."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import llm_models as LM
import qkern
from cli_util import run, tiny_llama_folder
from qkern.io.shards import Checkpoint, read_header, write_streamed
from qkern.models import load_pretrained
from qkern.quantization import text_calibration
from qkern.quantization.registry import Batch
from qkern.streaming import MANIFEST, ActivationStore
from qkern.tools.cmdutil import load_tokenizer

GPTQ = qkern.GPTQConfig(bits=4, group_size=32)


def _llama(layers: int = 3, tied: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=LM.VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def _save(model, folder):
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = h.get_tensor(k)
    return out


def _reference(src, out, config, cal):
    ref = qkern.quantize_model(load_pretrained(src), config, cal, progress=False)
    qkern.export(ref, out, format="qkern")
    return ref


def _assert_same(streamed, reference):
    a, b = _tensors(streamed), _tensors(reference)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs"
    qa = json.loads((streamed / "config.json").read_text())["quantization_config"]
    qb = json.loads((reference / "config.json").read_text())["quantization_config"]
    assert qa == qb


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 3-block Llama checkpoint in shards, calibration, and the in-memory GPTQ result."""
    root = tmp_path_factory.mktemp("stream")
    src = _save(_llama(), root / "src")
    cal = LM.calibration()
    ref = _reference(src, root / "ref", GPTQ, cal)
    return root, src, cal, ref


def test_gptq_int4_equals_the_in_memory_path_bit_for_bit(llama, tmp_path):
    root, src, cal, ref = llama
    res = qkern.quantize_pretrained(src, GPTQ, tmp_path / "out", calibration=cal,
                                    progress=False)
    assert res.resumed_from == 0 and not res.offloaded
    assert len(res.report) == 3 * 7 and [r.name for r in res.report] == \
        [r.name for r in ref.qkern_report]
    _assert_same(tmp_path / "out", root / "ref")
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 4  # outside + 3 blocks
    assert not (tmp_path / "out" / ".qkern-stream").exists()
    loaded = qkern.from_pretrained(tmp_path / "out")
    ids = LM.calibration(2, 12, seed=7)
    for x in ids:
        assert torch.equal(LM.output(loaded, x), LM.output(ref, x))
    again = qkern.quantize_pretrained(src, GPTQ, tmp_path / "out", calibration=cal)
    assert again.resumed_from == 3 and len(again.report) == 21  # finished: nothing to do


class _Stop(Exception):
    pass


def _stop_after(k):
    def hook(i):
        if i == k:
            raise _Stop
    return hook


@pytest.mark.parametrize("limit", [None, 0])
def test_resume_after_block_k_gives_the_same_result(llama, tmp_path, limit):
    root, src, cal, _ = llama
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        qkern.quantize_pretrained(src, GPTQ, out, calibration=cal, memory_limit=limit,
                                  on_block=_stop_after(1))
    m = json.loads((out / MANIFEST).read_text())
    assert m["done"] == [0, 1] and not m["finished"]
    assert not (out / "config.json").exists()  # an unfinished folder does not look loadable
    block0 = (out / "model-00002-of-00004.safetensors").stat().st_mtime_ns
    res = qkern.quantize_pretrained(src, GPTQ, out, calibration=cal, memory_limit=limit)
    assert res.resumed_from == 2 and len(res.report) == 21
    assert (out / "model-00002-of-00004.safetensors").stat().st_mtime_ns == block0
    _assert_same(out, root / "ref")


def test_offloaded_activations_give_the_same_result(llama, tmp_path):
    root, src, cal, _ = llama
    # 2 of the 4 batches fit: the store goes to disk part way through block 0's capture
    limit = 2 * 16 * 64 * 4 + 4096
    res = qkern.quantize_pretrained(src, GPTQ, tmp_path / "out", calibration=cal,
                                    memory_limit=limit, resume=False)
    assert res.offloaded
    _assert_same(tmp_path / "out", root / "ref")


def test_resume_false_starts_over_and_resume_checks_the_run(llama, tmp_path):
    root, src, cal, _ = llama
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        qkern.quantize_pretrained(src, GPTQ, out, calibration=cal, on_block=_stop_after(0))
    other = qkern.GPTQConfig(bits=4, group_size=64)
    with pytest.raises(ValueError, match="other config"):
        qkern.quantize_pretrained(src, other, out, calibration=cal)
    with pytest.raises(ValueError, match="other calibration"):
        qkern.quantize_pretrained(src, GPTQ, out, calibration=LM.calibration(seed=3))
    res = qkern.quantize_pretrained(src, GPTQ, out, calibration=cal, resume=False)
    assert res.resumed_from == 0
    _assert_same(out, root / "ref")


@pytest.mark.parametrize("arch", ["tied", "qwen2", "opt", "gpt2"])
def test_other_models_equal_the_in_memory_path(tmp_path, arch):
    model = _llama(2, tied=True) if arch == "tied" else LM.build(arch)
    src = _save(model, tmp_path / "src")
    cal = LM.calibration(3)
    _reference(src, tmp_path / "ref", GPTQ, cal)
    qkern.quantize_pretrained(src, GPTQ, tmp_path / "out", calibration=cal)
    _assert_same(tmp_path / "out", tmp_path / "ref")
    if arch == "tied":
        assert "lm_head.weight" not in _tensors(tmp_path / "out")


def test_awq_transform_equals_the_in_memory_path(llama, tmp_path):
    _, src, cal, _ = llama
    cfg = qkern.AWQConfig(bits=4, group_size=32, n_grid=4, clip_grid=4)
    _reference(src, tmp_path / "ref", cfg, cal)
    qkern.quantize_pretrained(src, cfg, tmp_path / "out", calibration=cal, memory_limit=0)
    _assert_same(tmp_path / "out", tmp_path / "ref")


def test_a_method_with_cross_block_state_refuses_to_resume(llama, tmp_path):
    _, src, cal, _ = llama
    cfg = qkern.OmniQuantConfig(bits=4, group_size=32, epochs=1)  # float targets, block to block
    with pytest.raises(_Stop):
        qkern.quantize_pretrained(src, cfg, tmp_path / "out", cal, on_block=_stop_after(0))
    with pytest.raises(ValueError, match="cannot be resumed exactly; pass resume=False"):
        qkern.quantize_pretrained(src, cfg, tmp_path / "out", cal)


def test_bad_input_is_refused(llama, tmp_path):
    _, src, cal, _ = llama
    with pytest.raises(ValueError, match="block-by-block LLM methods"):
        qkern.quantize_pretrained(src, qkern.WeightOnlyConfig(), tmp_path / "a")
    with pytest.raises(ValueError, match="memory_limit"):
        qkern.quantize_pretrained(src, GPTQ, tmp_path / "a", cal, memory_limit=-1)
    with pytest.raises(ValueError, match="needs calibration"):
        qkern.quantize_pretrained(src, GPTQ, tmp_path / "a")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a quantize_pretrained output"):
        qkern.quantize_pretrained(src, GPTQ, foreign, cal)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="already quantized"):
        qkern.quantize_pretrained(llama[0] / "ref", GPTQ, tmp_path / "b", cal)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        qkern.quantize_pretrained(empty, GPTQ, tmp_path / "c", cal)


def test_a_missing_tensor_is_named(tmp_path):
    src = _save(_llama(2), tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    shard = src / index["weight_map"].pop(key)
    with safe_open(str(shard), "pt") as h:
        rest = {k: h.get_tensor(k) for k in h.keys() if k != key}
    save_file(rest, str(shard), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        qkern.quantize_pretrained(src, qkern.RTNConfig(bits=4, group_size=32),
                                  tmp_path / "out", LM.calibration(2))


def test_write_streamed_is_read_by_the_safetensors_package(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g)
               .bfloat16(), "i8": torch.randint(-128, 127, (4, 4), generator=g, dtype=torch.int8),
               "b": torch.rand(5, generator=g) > 0.5, "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "f8": torch.randn(6, generator=g)
               .to(torch.float8_e4m3fn), "i64": torch.arange(3)}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    n = write_streamed(tmp_path / "x.safetensors", specs, tensors.__getitem__, {"a": "b"})
    assert n == sum(v.numel() * v.element_size() for v in tensors.values())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as h:
        assert h.metadata() == {"a": "b"}
        for k, v in tensors.items():
            got = h.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert torch.equal(got.reshape(-1).view(torch.uint8),
                               v.reshape(-1).view(torch.uint8)), k
    infos, meta = read_header(tmp_path / "x.safetensors")
    assert meta == {"a": "b"} and set(infos) == set(tensors)
    with pytest.raises(ValueError, match="header says"):
        write_streamed(tmp_path / "y.safetensors", specs, lambda k: torch.zeros(1))
    assert not (tmp_path / "y.safetensors").exists()
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="do not fit"):
        read_header(tmp_path / "cut.safetensors")


def test_checkpoint_reads_what_save_file_wrote(tmp_path):
    t = {"a": torch.randn(4, 6), "b": torch.arange(5, dtype=torch.int32)}
    save_file(t, str(tmp_path / "model.safetensors"))
    ck = Checkpoint(tmp_path)
    for k, v in t.items():
        assert torch.equal(ck.read(k), v)
    with pytest.raises(KeyError, match="no tensor 'c'"):
        ck.read("c")


def test_activation_store_offloads_past_its_limit(tmp_path):
    batches = [Batch((torch.randn(1, 4, 8),), {"position_ids": torch.arange(4)[None]})
               for _ in range(5)]
    size = 4 * 8 * 4 + 4 * 8
    store = ActivationStore(tmp_path / "acts", memory_limit=2 * size)
    for b in batches:
        store.append(b)
    assert store.offloaded and len(store) == 5 and store.nbytes == 5 * size
    assert len(list((tmp_path / "acts").glob("batch-*.pt"))) == 5
    for got, want in zip(list(store) + store[1:3], batches + batches[1:3]):
        assert torch.equal(got.args[0], want.args[0])
        assert torch.equal(got.kwargs["position_ids"], want.kwargs["position_ids"])
    store.remove()
    assert not (tmp_path / "acts").exists()


def test_cli_quantize_streams_resumes_and_equals_the_in_memory_path(tmp_path):
    pytest.importorskip("tokenizers")
    folder, text = tiny_llama_folder(tmp_path)
    cal = text_calibration(text, load_tokenizer(None, folder, LM.VOCAB), n_samples=4,
                           seqlen=32)
    cfg = qkern.GPTQConfig(bits=4, group_size=32)
    _reference(folder, tmp_path / "ref", cfg, cal)
    argv = ["quantize", folder, tmp_path / "out", "--method", "gptq", "--group-size", 32,
            "--calib", text, "--samples", 4, "--seqlen", 32]
    with pytest.raises(_Stop):  # an interrupted run: block 0 done
        qkern.quantize_pretrained(folder, cfg, tmp_path / "out", cal, on_block=_stop_after(0))
    rc, stdout, stderr = run(*argv, "--memory-limit", "1KB")
    assert rc == 0, stderr
    assert "resumed at block 1" in stderr and "quantize + write block by block" in stdout
    _assert_same(tmp_path / "out", tmp_path / "ref")
    rc, _, err = run(*argv)  # finished: replacing it needs --overwrite
    assert rc == 2 and "--overwrite" in err
    rc, _, err = run(*argv, "--overwrite", "--no-resume")
    assert rc == 0, err
    _assert_same(tmp_path / "out", tmp_path / "ref")
    for extra, msg in ((["--memory-limit", "lots"], "not a size"),
                       (["--memory-limit", "1MB", "--format", "gptq"], "--format qkern")):
        rc, _, err = run(*argv[:2], tmp_path / "other", *argv[3:], *extra)
        assert rc == 2 and msg in err, err
