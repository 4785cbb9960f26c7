"""``qkern inspect``: format, per-layer formats / groups / symmetry / bits per weight / kernels
and consumers of each checkpoint kind, the aligned table, --json, --help, exit codes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import qkern  # noqa: E402
from cli_util import BYTELM, run  # noqa: E402
from qkern.models import load_pretrained  # noqa: E402
from qkern.tools import cli  # noqa: E402

# int4 codes + a float32 scale and an int4 zero point per group of 32
ASYM_G32_BITS = 4 + (32 + 4) / 32


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    q = qkern.quantize_model(load_pretrained(BYTELM),
                             qkern.RTNConfig(bits=4, group_size=32, sym=False), progress=False)
    paths = {"qkern": root / "q", "gptq": root / "g", "compressed-tensors": root / "ct"}
    for fmt, p in paths.items():
        qkern.export(q, p, format=fmt)
    if importlib.util.find_spec("gguf") is not None:
        paths["gguf"] = root / "m.gguf"
        with warnings.catch_warnings():  # Q4_0 requantizes the asymmetric groups (expected)
            warnings.simplefilter("ignore", UserWarning)
            qkern.export(q, paths["gguf"], format="gguf", type="Q4_0")
    return paths


def _info(path) -> dict:
    rc, out, err = run("inspect", path, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_qkern_folder_layers(exports):
    info = _info(exports["qkern"])
    assert info["format"] == "qkern" and info["architecture"] == "LlamaForCausalLM"
    rows = info["layers"]
    assert len(rows) == 28  # 4 blocks x 7 linears
    for r in rows:
        assert (r["format"], r["group"], r["sym"], r["kernel"]) == ("int4", 32, False,
                                                                   "w4_exact")
        assert r["bits"] == pytest.approx(ASYM_G32_BITS)
    assert info["mean_bits_per_weight"] == pytest.approx(ASYM_G32_BITS)
    assert info["float_linears"] == ["lm_head"]
    assert info["bytes"] == sum(f.stat().st_size for f in exports["qkern"].iterdir())
    assert "transformers" in " ".join(info["consumers"])


@pytest.mark.parametrize("fmt, consumer", [("gptq", "vLLM"), ("compressed-tensors", "vLLM"),
                                           ("gguf", "llama.cpp")])
def test_other_formats(exports, fmt, consumer):
    if fmt not in exports:
        pytest.skip("no gguf package")
    info = _info(exports[fmt])
    assert info["format"] == fmt
    assert any(consumer in c for c in info["consumers"])
    assert len(info["layers"]) == 28
    assert {r["group"] for r in info["layers"]} == {32}


def test_text_table_is_aligned(exports):
    rc, out, err = run("inspect", exports["qkern"])
    assert rc == 0, err
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    table = lines[head:]
    assert len(table) == 2 + 28
    start = table[0].index("kernel")
    assert all(line[start:].startswith("w4_exact") for line in table[2:])
    assert table[1].replace(" ", "").strip("-") == ""
    assert "bits/weight  5.125" in out and "loads in" in out


def test_qkern_save_file(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    q = qkern.quantize_model(m, qkern.WeightOnlyConfig(fmt="int4", group_size=32))
    qkern.save(q, tmp_path / "m.qk")
    info = _info(tmp_path / "m.qk")
    assert info["format"] == "qkern-file" and info["config"]["type"] == "WeightOnlyConfig"
    assert [r["layer"] for r in info["layers"]] == ["0", "2"]
    for r in info["layers"]:
        mod = q.get_submodule(r["layer"])
        assert r["bits"] == pytest.approx(mod.weight_q.bits_per_element)  # its real bytes
        assert (r["format"], r["group"], r["sym"], r["kernel"]) == ("int4", 32, True, mod.kernel)


def test_float_folder():
    info = _info(BYTELM)
    assert info["format"] == "float" and info["layers"] == []
    rc, out, _ = run("inspect", BYTELM)
    assert rc == 0 and "qkern quantize" in out


def test_help():
    rc, out, _ = run("inspect", "--help")
    assert rc == 0 and "--json" in out and "FILE_OR_DIR" in out
    sub = next(a for a in cli._build_parser()._actions if a.dest == "command")
    assert all(a.help for a in sub.choices["inspect"]._actions)


def test_errors(tmp_path, exports):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"quantization_config":
                                                   {"quant_method": "bitsandbytes"}}))
    for path, message in [(tmp_path / "nope", "no such file"), (junk, "not a checkpoint"),
                          (tmp_path, "no config.json"), (other, "bitsandbytes")]:
        rc, _, err = run("inspect", path)
        assert rc == 2 and message in err and "Traceback" not in err, err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((exports["qkern"] / "config.json").read_text())
    rc, _, err = run("inspect", bad)  # no weights
    assert rc == 1 and err.strip().splitlines()[-1].startswith("qkern inspect: error: ")
    rc, _, err = run("inspect")
    assert rc == 2 and "FILE_OR_DIR" in err


def test_console_entry_point_exit_status(tmp_path):
    """``python -m qkern`` as a process: the status and the one stderr line reach the shell."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(qkern.__file__))}
    env.pop("QKERN_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "qkern", "inspect", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [f"qkern inspect: error: {tmp_path / 'nope'}: no "
                                             "such file or folder"]
