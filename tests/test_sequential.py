"""The block-by-block LLM pipeline (qkern.quantization.sequential / blocks / data) on tiny
random transformers models of each architecture and on the shipped wikitext-bytelm: RTN
weights against the numpy reference, the user's model untouched, true-sequential inputs,
refusals before any work."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import llm_models as LM
import qkern
from qkern.models import load_llama
from qkern.models.assets import shipped_path
from qkern.quantization import (
    RTNConfig,
    SequentialQuantizer,
    find_blocks,
    fold_scales,
    quantize_sequential,
    scale_pairs,
    text_calibration,
)
from qkern.quantization.blocks import block_linears, sequential_groups
from qkern.quantization.sequential import block_outputs, capture_first_block_inputs
from qkern.tools.reports import llm
from reference import quantize_int


def _float_weights(model) -> dict[str, torch.Tensor]:
    """{name: (out, in) weight} of every block linear (Conv1D transposed)."""
    name, blocks = find_blocks(model)
    out = {}
    for i, b in enumerate(blocks):
        for rel in block_linears(b):
            m = b.get_submodule(rel)
            w = m.weight.detach().float()
            out[f"{name}.{i}.{rel}"] = w.t() if type(m).__name__ == "Conv1D" else w
    return out


@pytest.mark.parametrize("arch", LM.ARCHS)
@pytest.mark.parametrize("bits,group", [(4, 32), (3, None), (8, None)])
def test_rtn_weights_equal_numpy_reference(arch, bits, group):
    model = LM.build(arch)
    ref = _float_weights(model)
    before = copy.deepcopy(model.state_dict())
    q = qkern.quantize_model(model, RTNConfig(bits=bits, group_size=group), LM.calibration())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    mods = dict(q.named_modules())
    for name, w in ref.items():
        gran = ({"granularity": "group", "axis": 1, "group_size": group} if group
                else {"granularity": "channel", "axis": 0})
        *_, deq = quantize_int(w.numpy(), f"int{bits}", **gran)
        assert type(mods[name]).__name__ == "QuantLinear", name
        np.testing.assert_array_equal(mods[name].dequantize_weight().numpy(), deq, err_msg=name)
    # the rest of the model stays float; the quantized model computes with those weights
    emb = q.get_input_embeddings()
    assert type(emb) is nn.Embedding
    ids = LM.calibration(1, 12, seed=5)[0]
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in ref.items():
            m = ref_model.get_submodule(name)
            *_, deq = quantize_int(w.numpy(), f"int{bits}", **gran)
            t = torch.from_numpy(deq)
            m.weight.copy_(t.t() if type(m).__name__ == "Conv1D" else t)
    torch.testing.assert_close(LM.output(q, ids), LM.output(ref_model, ids), atol=2e-4, rtol=2e-4)
    assert len(q.qkern_report) == len(ref)


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_tied_embeddings_stay_tied(arch):
    q = qkern.quantize_model(LM.build(arch), RTNConfig(), LM.calibration())
    assert q.lm_head.weight is q.get_input_embeddings().weight


GROUPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "bert": [["attention.self.query", "attention.self.key", "attention.self.value"],
             ["attention.output.dense"], ["intermediate.dense"], ["output.dense"]],
}


@pytest.mark.parametrize("arch", list(GROUPS))
def test_true_sequential_groups(arch):
    model = LM.build(arch)
    _, blocks = find_blocks(model)
    inputs = capture_first_block_inputs(model, blocks[0], LM.calibration(1))
    blk = copy.deepcopy(blocks[0])
    qkern.quantization.linearize_conv1d(blk)
    groups = sequential_groups(blk, inputs[0], block_linears(blk))
    assert [sorted(g) for g in groups] == [sorted(g) for g in GROUPS[arch]]


class _Recorder(SequentialQuantizer):
    """RTN that keeps the Gram matrix it was given per layer."""

    def __init__(self, config):
        super().__init__(config)
        self.grams = {}

    def quantize_layer(self, name, linear, gram, cfg):
        self.grams[name] = gram
        return super().quantize_layer(name, linear, gram, cfg)


def test_layers_are_calibrated_on_the_quantized_prefix():
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    data = open(shipped_path("data/wikitext-2/wiki.valid.tokens"), "rb").read()
    cal = text_calibration(data, "bytes", 4, 64)
    rec = _Recorder(RTNConfig(bits=3, group_size=32))
    q = quantize_sequential(model, rec, cal)
    # independent: run the finished quantized model and capture each layer's inputs there
    for name in ("model.layers.2.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.3.self_attn.o_proj"):
        rows = []
        h = q.get_submodule(name).register_forward_pre_hook(
            lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).double()))
        with torch.no_grad():
            for b in cal:
                q(b)
        h.remove()
        x = torch.cat(rows)
        want = x.T @ x / x.shape[0]
        # the layer's own input is the quantized prefix's output (for o_proj / down_proj its
        # group's earlier layers are quantized too)
        torch.testing.assert_close(rec.grams[name], want, rtol=1e-4, atol=1e-6)
    # ... which differs from the float model's inputs
    rows = []
    h = model.get_submodule("model.layers.3.self_attn.o_proj").register_forward_pre_hook(
        lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for b in cal:
            model(b)
    h.remove()
    x = torch.cat(rows)
    assert not torch.allclose(rec.grams["model.layers.3.self_attn.o_proj"], x.T @ x / len(x),
                              rtol=1e-4, atol=1e-6)


def test_inplace_quantizes_the_given_model():
    model = LM.build("llama")
    out = qkern.quantize_model(model, RTNConfig(), LM.calibration(), inplace=True)
    assert out is model
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"


def test_interrupt_leaves_the_model_unmodified(monkeypatch):
    model = LM.build("gpt2")
    before = copy.deepcopy(model.state_dict())
    calls = []

    def boom(self, name, linear, gram, cfg):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return SequentialQuantizer.quantize_layer(self, name, linear, gram, cfg)

    monkeypatch.setattr(qkern.quantization.algorithms.rtn.RTNQuantizer, "quantize_layer", boom)
    with pytest.raises(KeyboardInterrupt):
        qkern.quantize_model(model, RTNConfig(), LM.calibration())
    assert len(calls) == 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_refusals_before_any_work(monkeypatch):
    calls = []
    orig = SequentialQuantizer.quantize_block
    monkeypatch.setattr(SequentialQuantizer, "quantize_block",
                        lambda self, ctx, log: calls.append(1) or orig(self, ctx, log))
    cal = LM.calibration()
    with pytest.raises(ValueError, match="no transformer blocks"):
        qkern.quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)),
                             RTNConfig(), [torch.randn(2, 64)])
    with pytest.raises(ValueError, match="no fused kernel"):
        qkern.quantize_model(LM.build("llama"), RTNConfig(bits=8, group_size=32), cal)
    with pytest.raises(ValueError, match="no fused kernel"):
        qkern.quantize_model(LM.build("llama"), RTNConfig(bits=5, group_size=32), cal)
    with pytest.raises(ValueError, match="model.float"):
        qkern.quantize_model(LM.build("llama").to(torch.bfloat16), RTNConfig(), cal)
    with pytest.raises(ValueError, match="bits"):
        RTNConfig(bits=9)
    with pytest.raises(ValueError, match="calibration is empty"):
        qkern.quantize_model(LM.build("llama"), RTNConfig(), [])

    class NeedsData(SequentialQuantizer):
        pass

    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_sequential(LM.build("llama"), NeedsData(RTNConfig()), None)
    assert calls == []


def test_text_calibration_windows_and_errors(tmp_path):
    text = bytes(range(256)) * 40  # 10240 tokens
    p = tmp_path / "t.txt"
    p.write_bytes(text)
    got = text_calibration(str(p), "bytes", 8, 256, seed=3)
    assert len(got) == 8 and all(t.shape == (1, 256) and t.dtype == torch.int64 for t in got)
    starts = [int(t[0, 0]) for t in got]
    assert all(s == 0 for s in starts)  # windows fall on multiples of 256 here
    assert len({tuple(t[0].tolist()) for t in got}) == 1
    with pytest.raises(ValueError, match="10240 tokens"):
        text_calibration(text, "bytes", 41, 256)
    s = "abcdefghijk"
    words = text_calibration(s, lambda t: [ord(c) for c in t], 2, 3)
    got = ["".join(map(chr, w[0].tolist())) for w in words]
    assert len(set(got)) == 2 and all(g in ("abc", "def", "ghi") for g in got)
    with pytest.raises(ValueError, match="seqlen"):
        text_calibration(text, "bytes", 2, 0)


@pytest.mark.parametrize("arch,n", [("llama-mha", 4), ("llama", 3), ("opt", 4), ("gpt2", 2),
                                    ("bert", 1)])
def test_scale_pairs_fold_preserves_the_block(arch, n):
    model = LM.build(arch).double()
    _, blocks = find_blocks(model)
    inputs = capture_first_block_inputs(model, blocks[0], LM.calibration(2))
    blk = copy.deepcopy(blocks[0])
    qkern.quantization.linearize_conv1d(blk)
    pairs = scale_pairs(blk)
    assert len(pairs) == n
    want = block_outputs(blk, inputs)
    g = torch.Generator().manual_seed(0)
    for prev, nexts in pairs:
        k = blk.get_submodule(nexts[0]).in_features
        fold_scales(blk, prev, nexts, torch.rand(k, generator=g, dtype=torch.float64) * 3 + 0.2)
    for a, b in zip(block_outputs(blk, inputs), want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="positive"):
        fold_scales(blk, pairs[0][0], pairs[0][1], -torch.ones(k))


def test_then_hands_layers_to_the_inner_method_and_round_trips_json():
    class Halve(SequentialQuantizer):
        """A transform: scales every block's first pair by 2 (function-preserving)."""

        def process_block(self, ctx):
            prev, nexts = ctx.pairs[0]
            k = ctx.block.get_submodule(nexts[0]).in_features
            fold_scales(ctx.block, prev, nexts, torch.full((k,), 2.0))

    model = LM.build("llama-mha")
    cfg = RTNConfig(bits=4, group_size=32, sym=False)
    q = Halve(RTNConfig(bits=4, group_size=32, sym=False))
    q.inner = SequentialQuantizer(cfg)
    got = quantize_sequential(model, q, LM.calibration())
    w = model.model.layers[1].self_attn.q_proj.weight.detach() * 2
    *_, deq = quantize_int(w.numpy(), "int4", granularity="group", axis=1, group_size=32,
                           symmetric=False)
    np.testing.assert_array_equal(
        got.model.layers[1].self_attn.q_proj.dequantize_weight().numpy(), deq)
    with pytest.raises(ValueError, match="differs"):
        qkern.quantization.algorithms.rtn.check_weight_bits(
            type("C", (), {"bits": 4, "group_size": 64, "sym": True,
                           "then": RTNConfig(bits=4, group_size=128)})())
    nested = {"type": "RTNConfig", "bits": 3, "group_size": 64, "sym": True, "include": None,
              "exclude": [], "overrides": {}}
    assert qkern.quantization.BaseConfig.from_dict(nested) == RTNConfig(bits=3, group_size=64)


def test_a_local_folder_loads_through_transformers():
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    cal = text_calibration(shipped_path("data/wikitext-2/wiki.valid.tokens"), "bytes", 2, 64)
    folder = shipped_path("models/wikitext-bytelm")
    q = qkern.quantize_model(folder, RTNConfig(bits=4, group_size=64), cal)
    assert type(q).__name__ == "LlamaForCausalLM"
    ref = qkern.quantize_model(model, RTNConfig(bits=4, group_size=64), cal)
    ids = cal[0]
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, ref(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="config.json"):
        qkern.quantize_model(shipped_path("data"), RTNConfig(), cal)


def test_a_layer_no_kernel_takes_stays_float_and_is_reported():
    model = load_llama(shipped_path("models/stories260k"))  # intermediate 172: not a multiple of 32
    cal = [torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))]
    with pytest.warns(UserWarning, match=r"5 layer\(s\) left in float") as rec:
        q = qkern.quantize_model(model, RTNConfig(bits=4, group_size=32), cal)
    assert sum("left in float" in str(w.message) for w in rec) == 1
    assert type(q.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_save_load_round_trip(arch, tmp_path):
    q = qkern.quantize_model(LM.build(arch), RTNConfig(bits=4, group_size=32), LM.calibration())
    qkern.save(q, tmp_path / "m.qk")
    r = qkern.load(tmp_path / "m.qk", lambda: LM.build(arch, seed=3))  # other float weights
    ids = LM.calibration(1, 10, seed=7)[0]
    assert torch.equal(LM.output(q, ids), LM.output(r, ids))


def test_llm_report_table_runs():
    out = llm.bytelm_table(["RTN"], ["w4 g128"], n_cal=2)
    rows = [r for r in out.splitlines() if r.startswith("| ")]
    fp32, rtn = (float(r.split("|")[2].split()[0]) for r in rows[1:3])
    assert abs(fp32 - 1.922) < 0.005 and fp32 < rtn < fp32 + 0.05
