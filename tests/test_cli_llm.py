"""qkern quantize / eval / inspect: success paths on the shipped wikitext-bytelm, --help, and
the exit status of each error (0 ok, 1 failure, 2 usage)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import qkern
from qkern.models import load_pretrained
from qkern.models.assets import shipped_path
from qkern.quantization import text_calibration
from qkern.tools import demo
from qkern.tools.cli import main

BYTELM = shipped_path("models/wikitext-bytelm")
TEST = shipped_path("data/wikitext-2/wiki.test.tokens")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "q4"
    rc = main(["quantize", str(BYTELM), str(out), "--method", "rtn", "--bits", "4",
               "--group-size", "32", "--samples", "2", "--seqlen", "64"])
    assert rc == 0
    return out


def _bpb(model, data: bytes, n: int = 4, L: int = 256) -> float:
    """Next-byte cross-entropy in bits, written here from the definition."""
    ids = torch.tensor(list(data[:n * L])).view(n, L)
    with torch.no_grad():
        logits = model(ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    return float(nll) / math.log(2)


def test_quantize_then_eval_prints_the_models_bits_per_byte(quantized, capsys):
    capsys.readouterr()
    assert main(["eval", str(quantized), "--windows", "4"]) == 0
    line = capsys.readouterr().out
    got = float(line.split(": ")[1].split(" bits")[0])
    # the same quantization by the Python API, measured independently
    cal = text_calibration(shipped_path("data/wikitext-2/wiki.valid.tokens"), "bytes", 2, 64)
    ref = qkern.quantize_model(load_pretrained(BYTELM),
                               qkern.RTNConfig(bits=4, group_size=32, sym=False), cal)
    assert got == pytest.approx(_bpb(ref, TEST.read_bytes()), abs=1e-4)


def test_eval_kl_to_the_reference_is_small_and_zero_for_itself(quantized, capsys):
    assert main(["eval", str(BYTELM), "--windows", "2", "--reference", str(BYTELM)]) == 0
    out = capsys.readouterr().out
    assert float(out.split("KL to")[1].split()[1]) == pytest.approx(0.0, abs=1e-6)
    assert main(["eval", str(quantized), "--windows", "2", "--reference", str(BYTELM)]) == 0
    kl = float(capsys.readouterr().out.split("KL to")[1].split()[1])
    assert 0 < kl < 0.05


def test_inspect_lists_every_layer(quantized, capsys):
    assert main(["inspect", str(quantized), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "qkern" and len(info["layers"]) == 28
    assert {r["kernel"] for r in info["layers"]} == {"w4_exact"}
    assert all(r["group_size"] == 32 and r["format"] in ("int4", "uint4") for r in info["layers"])
    assert main(["inspect", str(quantized)]) == 0
    assert "w4_exact" in capsys.readouterr().out


def test_quantize_to_gptq_folder(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["quantize", str(BYTELM), str(out), "--method", "gptq", "--bits", "4",
                 "--group-size", "32", "--samples", "2", "--seqlen", "64", "--format",
                 "gptq"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"][
        "quant_method"] == "gptq"
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gptq" and len(info["layers"]) == 28


@pytest.mark.parametrize("cmd", ["quantize", "eval", "inspect"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "Exit status" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["quantize", "/nonexistent", "out"],
    ["quantize", str(BYTELM), "x", "--method", "nope"],
    ["quantize", str(BYTELM), "x", "--bits", "9"],
    ["quantize", str(BYTELM), "x", "--method", "llm_int8", "--bits", "3"],
    ["eval", "/nonexistent"],
    ["eval", str(BYTELM), "--data", "/nonexistent.txt"],
    ["inspect", "/nonexistent"],
    ["inspect", str(BYTELM)],
])
def test_usage_errors_exit_2_with_one_line(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


def test_existing_output_is_refused(quantized, capsys):
    assert main(["quantize", str(BYTELM), str(quantized), "--samples", "2", "--seqlen",
                 "64"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_demo_speed_caveat_follows_the_load(monkeypatch):

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (3.5, 1.0, 1.0))
    assert "unreliable" in demo.load_caveat() and "3.5" in demo.load_caveat()
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.2, 1.0, 1.0))
    assert "unreliable" not in demo.load_caveat() and "0.2" in demo.load_caveat()
