"""`qkern demo` on the real stories260K checkpoint shipped in models/: the numbers it reports
(bits per weight from each format's definition, SQNR against an independent numpy
quantizer, orderings between formats), finding the model, the safetensors reader (qkern.io)
and the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import qkern
from qkern import formats as F
from qkern.io import read_safetensors
from qkern.models import assets
from qkern.tools import cli, demo

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "stories260k"
N_WEIGHTS = 512 * 64 + 5 * (64 * 64 * 2 + 32 * 64 * 2 + 172 * 64 * 3)  # embed + 5 layers


@pytest.fixture(scope="module")
def model():
    return demo.load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def results(model):
    return {r.spec.key: r for r in demo.evaluate_weights(model, demo.DEFAULT_SPECS)}


def test_model_is_the_shipped_checkpoint(model):
    assert model.name == "stories260k"
    assert model.config["hidden_size"] == 64 and model.config["intermediate_size"] == 172
    assert model.n_params == 260_032
    mats = demo.weight_matrices(model)
    assert len(mats) == 1 + 5 * 7  # tied embedding + q, k, v, o, gate, up, down per layer
    assert sum(w.numel() for w in mats.values()) == N_WEIGHTS == 259_328
    assert all(w.dim() == 2 and w.dtype == torch.float32 for w in mats.values())
    assert not any("norm" in k for k in mats)
    assert (MODEL_DIR / "LICENSE").read_text().startswith("The model weights")


def test_every_requested_format_is_covered():
    fmts = {s.format for s in demo.DEFAULT_SPECS}
    assert fmts >= {"int8", "int4", "int3", "int2", "nf4", "fp4_e2m1", "fp4_bnb", "fp8_e4m3",
                    "fp8_e5m2", "mxfp4", "mxfp8_e4m3", "mxint8", "log2_4", "ternary", "binary",
                    "mulaw", "alaw"}
    keys = [s.key for s in demo.DEFAULT_SPECS]
    assert len(keys) == len(set(keys))
    assert not set(keys) & (set(F.names()) - fmts)  # a key never shadows another format


# ---- bits per weight, from the definition of each format -------------------------------------


def _expected_bytes(shape, spec: demo.Spec) -> int:
    """Packed size of one (out, in) matrix: codes at `bits` each, one scale (fp32, or 8-bit
    E8M0 for MX) per scale group, zero points at `bits`, nested int8 scales + one fp32 per 256
    blocks + the fp32 mean for double quantization."""
    fmt = spec.fmt
    rows, cols = shape
    numel = rows * cols
    if spec.granularity == "tensor":
        n_scales = 1
    elif spec.granularity == "channel":
        n_scales = rows
    else:
        g = spec.block
        assert cols % g == 0 or rows % g == 0, "stories260K always has a dim that fits"
        n_scales = numel // g
    total = math.ceil(numel * fmt.bits / 8)
    if spec.double_quant:
        total += n_scales + 4 * math.ceil(n_scales / 256) + 4
    else:
        total += math.ceil(n_scales * fmt.scale_bits / 8)
    if not spec.symmetric:
        total += math.ceil(n_scales * fmt.bits / 8)
    return total


def test_bits_per_weight_match_each_formats_definition(model, results):
    mats = demo.weight_matrices(model)
    for spec in demo.DEFAULT_SPECS:
        r = results[spec.key]
        expected = sum(_expected_bytes(tuple(w.shape), spec) for w in mats.values())
        assert r.nbytes == expected, spec.key
        assert r.n_weights == N_WEIGHTS
        assert r.bits_per_weight == pytest.approx(8 * expected / N_WEIGHTS)


def test_bits_per_weight_values(results):
    b = {k: r.bits_per_weight for k, r in results.items()}
    rows = 512 + 5 * (64 + 32 + 32 + 64 + 172 + 172 + 64)  # one fp32 scale per output row
    per_channel = 32 * rows / N_WEIGHTS
    assert b["int8-ch"] == pytest.approx(8 + per_channel) and 8.4 < b["int8-ch"] < 8.5
    assert b["int4-ch"] == pytest.approx(4 + per_channel)
    assert b["int4-g32"] == 4 + 32 / 32
    assert b["int4-g32-asym"] == 4 + 32 / 32 + 4 / 32
    assert b["int3-g32"] == 3 + 32 / 32
    assert b["int2-g32-asym"] == 2 + 32 / 32 + 2 / 32
    assert b["nf4-b64"] == b["fp4_e2m1-b64"] == b["fp4_bnb-b64"] == 4 + 32 / 64
    assert 4 + 8 / 64 < b["nf4-b64-dq"] < 4.2 < b["nf4-b64"]
    assert b["mxfp4"] == 4 + 8 / 32
    assert b["mxfp8_e4m3"] == b["mxint8"] == 8 + 8 / 32
    assert b["fp8_e4m3-tensor"] == b["fp8_e5m2-tensor"] == pytest.approx(8 + 36 * 32 / N_WEIGHTS)
    assert b["log2_4-ch"] == pytest.approx(4 + per_channel)
    assert b["ternary-ch"] == pytest.approx(2 + per_channel)  # stored in 2 bits
    assert b["binary-ch"] == pytest.approx(1 + per_channel)
    assert b["mulaw-ch"] == b["alaw-ch"] == pytest.approx(8 + per_channel)


def test_down_proj_groups_fall_back_to_the_output_dim(model, results):
    for key in ("int4-g32", "nf4-b64", "mxfp4"):
        r = results[key]
        assert set(r.unusual) == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(5)}
        assert set(r.unusual.values()) == {"out"}
        assert all(v == "in" for k, v in r.placement.items() if k not in r.unusual)
        assert "†" in r.granularity()
    assert results["int8-ch"].unusual == {} and "†" not in results["int8-ch"].granularity()


# ---- accuracy ----------------------------------------------------------------------------------


def _np_int_sqnr(mats, bits, group):
    """Independent symmetric absmax integer quantizer (round half to even) in numpy;
    group=None means per output row, else groups of `group` along the input dim (the output
    dim where it does not divide the input dim)."""
    qmax = 2 ** (bits - 1) - 1
    sig = noise = 0.0
    for w in mats.values():
        x = w.numpy().astype(np.float32)
        if group is not None:
            x = x if x.shape[1] % group == 0 else x.T
            xg = x.reshape(-1, group)
        else:
            xg = x
        scale = np.abs(xg).max(axis=1, keepdims=True) / np.float32(qmax)
        scale = np.where(scale > 0, scale, np.float32(1))
        deq = np.clip(np.rint(xg / scale), -qmax - 1, qmax) * scale
        sig += float(np.square(xg.astype(np.float64)).sum())
        noise += float(np.square(deq.astype(np.float64) - xg).sum())
    return 10 * math.log10(sig / noise)


def test_sqnr_agrees_with_an_independent_numpy_quantizer(model, results):
    mats = demo.weight_matrices(model)
    assert results["int8-ch"].sqnr_db == pytest.approx(_np_int_sqnr(mats, 8, None), abs=0.01)
    assert results["int4-ch"].sqnr_db == pytest.approx(_np_int_sqnr(mats, 4, None), abs=0.01)
    assert results["int4-g32"].sqnr_db == pytest.approx(_np_int_sqnr(mats, 4, 32), abs=0.01)
    assert results["int3-g32"].sqnr_db == pytest.approx(_np_int_sqnr(mats, 3, 32), abs=0.01)


def test_error_metrics_are_consistent(model, results):
    mats = demo.weight_matrices(model)
    for r in results.values():
        assert math.isfinite(r.sqnr_db) and r.sqnr_db > 0, r.spec.key
        assert r.rel_error == pytest.approx(10 ** (-r.sqnr_db / 20), rel=1e-9)
        assert 0 < r.max_abs_error < 2.0
    # round-to-nearest int8: error at most half a step of the coarsest row
    half_step = max(float(w.abs().amax(dim=1).max()) for w in mats.values()) / 127 / 2
    assert results["int8-ch"].max_abs_error <= half_step * (1 + 1e-5)


def test_sqnr_orderings(results):
    s = {k: r.sqnr_db for k, r in results.items()}
    assert s["int8-ch"] > 40
    assert s["mxint8"] > 38
    assert s["int3-g32"] < s["int4-g32"] < s["int8-ch"]
    assert s["int2-g32-asym"] < s["int3-g32"]
    assert s["int4-ch"] < s["int4-g32"] < s["int4-g32-asym"]  # finer scales, then a zero point
    assert abs(s["nf4-b64-dq"] - s["nf4-b64"]) < 0.05  # nested scales cost ~nothing
    assert s["nf4-b64"] > s["fp4_bnb-b64"]
    assert 28 < s["fp8_e4m3-tensor"] < 36 and 22 < s["fp8_e5m2-tensor"] < 30  # ~6 dB/mantissa bit
    assert 35 < s["mulaw-ch"] < 41 and 35 < s["alaw-ch"] < 41  # G.711's ~38 dB
    assert 2 < s["binary-ch"] < 6  # sign + mean|x| of a roughly Gaussian weight: ~4 dB
    # 4 bits beat 2-3 bits whatever the format
    four = [s[k] for k in ("int4-g32", "nf4-b64", "fp4_e2m1-b64", "mxfp4", "int4-ch")]
    assert min(four) > max(s["int3-g32"], s["int2-g32-asym"], s["ternary-ch"], s["binary-ch"])


def test_results_are_deterministic(model, results):
    again = demo.evaluate_weights(model, demo.select_specs("int4-g32-asym,nf4-b64-dq"))
    for r in again:
        assert r.sqnr_db == results[r.spec.key].sqnr_db
        assert r.nbytes == results[r.spec.key].nbytes


# ---- the table ---------------------------------------------------------------------------------


def test_table_is_sorted_and_complete():
    out = io.StringIO()
    ctx = demo.run(MODEL_DIR, out=out, sections=demo.SECTIONS[:1])
    text = out.getvalue()
    header = text.splitlines()[0]
    assert header.startswith("## ") and header.endswith(" s")
    assert "stories260k" in header and "260,032 parameters" in header
    assert f"ISA {qkern.get_isa()}" in header and "259,328 weights" in text
    rows = [ln.split("|")[1:-1] for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| scheme")]
    assert sorted(r[0].strip() for r in rows) == sorted(s.key for s in demo.DEFAULT_SPECS)
    order = [(float(r[3]), -float(r[4])) for r in rows]  # bits/weight, then best SQNR first
    assert order == sorted(order)
    by_key = {r.spec.key: r for r in ctx.results["weights"]}
    for r in rows:
        res = by_key[r[0].strip()]
        assert float(r[3]) == pytest.approx(res.bits_per_weight, abs=6e-4)
        assert float(r[4]) == pytest.approx(res.sqnr_db, abs=6e-3)
    assert "mlp.down_proj, 64x172" in text and "32 or 64" in text


def test_select_specs():
    assert [s.key for s in demo.select_specs("int4")] == ["int4-ch", "int4-g32", "int4-g32-asym"]
    assert [s.key for s in demo.select_specs("nf4, mxfp4")] == ["nf4-b64", "nf4-b64-dq", "mxfp4"]
    assert [s.key for s in demo.select_specs(["int4-g32", "int4"])] == [
        "int4-g32", "int4-ch", "int4-g32-asym"]
    (u8,) = demo.select_specs("uint8")
    assert (u8.granularity, u8.symmetric) == ("channel", False)
    (l8,) = demo.select_specs("log2_8")
    assert (l8.granularity, l8.symmetric) == ("channel", True)
    with pytest.raises(ValueError, match="unknown format or scheme 'int9'"):
        demo.select_specs("int9")
    with pytest.raises(ValueError, match="no formats"):
        demo.select_specs(" , ")


def test_every_registry_format_runs_through_the_demo(model):
    res = demo.evaluate_weights(model, demo.select_specs(F.names()))
    assert {r.spec.format for r in res} == set(F.names())
    for r in res:
        assert r.bits_per_weight >= F.get(r.spec.format).bits
        assert math.isfinite(r.sqnr_db) and r.sqnr_db > 0


# ---- finding and loading the model -------------------------------------------------------------


def test_find_model_explicit_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv(assets.MODEL_ENV, raising=False)
    assert assets.find_model(MODEL_DIR) == MODEL_DIR.resolve()
    weights = MODEL_DIR / "model.safetensors"
    assert assets.find_model(weights) == weights.resolve()
    with pytest.raises(assets.ModelNotFoundError, match="--model"):
        assets.find_model(tmp_path)
    monkeypatch.setenv(assets.MODEL_ENV, str(tmp_path / "nope"))
    with pytest.raises(assets.ModelNotFoundError, match=assets.MODEL_ENV):
        assets.find_model()
    copy = tmp_path / "copy"
    shutil.copytree(MODEL_DIR, copy)
    monkeypatch.setenv(assets.MODEL_ENV, str(copy))
    assert assets.find_model() == copy.resolve()
    m = demo.load_model()
    assert m.n_params == 260_032 and m.path == copy.resolve()


def test_find_model_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(assets.MODEL_ENV, raising=False)
    (tmp_path / "models").mkdir()
    shutil.copytree(MODEL_DIR, tmp_path / "models" / "stories260k")
    (tmp_path / "sub" / "dir").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sub" / "dir")
    checkout = Path(qkern.__file__).resolve().parents[2] / "models" / "stories260k"
    assert assets.find_model() in (checkout, (tmp_path / "models" / "stories260k").resolve())


def test_reader_matches_safetensors_load_file():
    st = pytest.importorskip("safetensors.torch")
    path = MODEL_DIR / "model.safetensors"
    ours, theirs = read_safetensors(path), st.load_file(str(path))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k])


def _write_safetensors(path, tensors):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int8: "I8", torch.int64: "I64"}
    for k, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape),
                     "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_reader_dtypes_and_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).half(),
               "c": torch.randn(2, 2, generator=g).bfloat16(),
               "d": torch.arange(-4, 4, dtype=torch.int8), "e": torch.zeros(0, 3),
               "f": torch.tensor([1, -2], dtype=torch.int64)}
    p = tmp_path / "t.safetensors"
    _write_safetensors(p, tensors)
    got = read_safetensors(p)
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t)
    raw = p.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-4])  # last tensor runs past the end
    with pytest.raises(ValueError, match="data_offsets"):
        read_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short"):
        read_safetensors(tmp_path / "tiny.safetensors")


# ---- command line ------------------------------------------------------------------------------


def test_cli_demo(capsys):
    assert cli.main(["demo", "--model", str(MODEL_DIR), "--formats", "int8-ch,nf4",
                     "--sections", "weights"]) == 0
    out = capsys.readouterr().out
    assert "| int8-ch | int8 | per-channel (row) | 8.433 |" in out
    assert "| nf4-b64-dq |" in out and "| nf4-b64 |" in out and "| int4" not in out


def test_cli_errors(capsys, tmp_path):
    assert cli.main(["demo", "--model", str(tmp_path), "--sections", "weights"]) == 2
    assert "qkern demo: error: --model=" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(MODEL_DIR), "--formats", "int9",
                     "--sections", "weights"]) == 2
    assert "unknown format or scheme 'int9'" in capsys.readouterr().err
    assert cli.main(["demo", "--sections", "weights,nope"]) == 2
    assert "unknown section(s) ['nope']" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_cli_formats(capsys):
    assert cli.main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in F.names():
        assert f"| {name} | {F.get(name).bits} | {F.get(name).kind} |" in out
    assert "| mxfp4 | 4 | codebook | 6 | 32 | E8M0 |" in out
    assert "| fp8_e4m3 | 8 | codebook | 448 |" in out


def test_cli_bench_delegates(monkeypatch):
    seen = []
    fake = types.ModuleType("qkern.tools.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "qkern.tools.bench", fake)
    monkeypatch.setattr(cli, "bench", fake, raising=False)
    assert cli.main(["bench", "core", "--quick"]) == 3
    assert seen == [["core", "--quick"]]


def test_python_dash_m(tmp_path):
    env = {**os.environ, assets.MODEL_ENV: str(MODEL_DIR)}
    p = subprocess.run([sys.executable, "-m", "qkern", "demo", "--formats", "mxint8",
                        "--sections", "weights"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                       check=False)
    assert p.returncode == 0, p.stderr
    assert "| mxint8 | mxint8 | group 32 along in†, E8M0 scales | 8.250 |" in p.stdout


def test_demo_speed_caveat_follows_the_load(monkeypatch):
    from qkern.tools import demo

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (3.5, 1.0, 1.0))
    assert "unreliable" in demo.load_caveat() and "3.5" in demo.load_caveat()
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.2, 1.0, 1.0))
    assert "unreliable" not in demo.load_caveat() and "0.2" in demo.load_caveat()


def test_shipped_assets_found_in_an_installed_wheels_assets(tmp_path, monkeypatch):
    """Outside a checkout (no models/ next to the package, none above the working directory)
    the demo's files come from the wheel's qkern/assets folder."""
    wheel = tmp_path / "site" / "qkern" / "assets"
    shutil.copytree(MODEL_DIR, wheel / "models" / "stories260k")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv(assets.MODEL_ENV, raising=False)
    monkeypatch.setattr(assets, "_CHECKOUT", tmp_path / "no-checkout")
    monkeypatch.setattr(assets, "_WHEEL_ASSETS", wheel)
    assert assets.shipped_path("models/stories260k") == wheel / "models" / "stories260k"
    assert assets.find_model() == wheel / "models" / "stories260k"
    with pytest.raises(FileNotFoundError, match="wheel"):
        assets.shipped_path("data/wikitext-2/wiki.test.tokens")
    monkeypatch.setattr(assets, "_WHEEL_ASSETS", tmp_path / "no-assets")
    with pytest.raises(assets.ModelNotFoundError, match="--model DIR"):
        assets.find_model()


def test_installed_wheel_carries_the_demo_models_and_data(tmp_path):
    """`pip install .` (make install) puts the demo's models and data in the wheel; `qkern demo`
    then runs from any directory. Only meaningful for an installed qkern, not a source tree on
    PYTHONPATH (the unit test above covers the lookup there)."""
    if (Path(qkern.__file__).resolve().parents[2] / "CMakeLists.txt").exists():
        pytest.skip("qkern imported from the source tree, not an installed wheel")
    root = Path(qkern.__file__).resolve().parent / "assets"
    for rel in ("models/stories260k/model.safetensors", "models/wikitext-bytelm/config.json",
                "data/wikitext-2/wiki.test.tokens", "data/wikitext-2/wiki.valid.tokens"):
        assert (root / rel).is_file(), rel
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", assets.MODEL_ENV)}
    r = subprocess.run([sys.executable, "-m", "qkern", "demo", "--sections", "weights",
                        "--formats", "int4"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stories260k" in r.stdout


def test_demo_exit_status_when_a_section_cannot_run(tmp_path, monkeypatch, capsys):
    """The same situation gives the same status: any section whose shipped file or optional
    package is missing prints 'skipped: reason' and the demo exits 1; a path the user gave that
    holds no model is a usage error (2)."""
    from qkern.tools import cli
    from qkern.tools.reports import minilm

    def no_package():
        raise ImportError("no module named tokenizers")

    monkeypatch.setattr(minilm, "run", no_package)
    assert cli.main(["demo", "--sections", "minilm"]) == 1
    out, err = capsys.readouterr()
    assert "skipped: no module named tokenizers" in out and "minilm:" in err
    monkeypatch.delenv(assets.MODEL_ENV, raising=False)
    monkeypatch.setattr(assets, "_CHECKOUT", tmp_path / "none")
    monkeypatch.setattr(assets, "_WHEEL_ASSETS", tmp_path / "none")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--sections", "weights"]) == 1
    out, err = capsys.readouterr()
    assert "skipped: cannot find the demo model" in out and "weights:" in err
    assert cli.main(["demo", "--sections", "weights", "--model", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
