"""The speed benches' command lines (not timed: the figures are the bench's job): ``--isa``,
the per-ISA table, the synthetic-Llama decode bench and ``python -m qkern.bench``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import qkern
from qkern.models.llama import LlamaConfig
from qkern.tools.bench import matmul
from qkern.tools.bench.decode_synth import SCHEMES, run_decode_synth, synthetic_llama


def test_isa_flag_errors(capsys):
    with pytest.raises(SystemExit) as e:
        matmul.main(["--quick", "--isa", "sse9"])
    assert e.value.code == 2 and "unknown ['sse9']" in capsys.readouterr().err


def test_per_isa_table_has_a_column_per_isa():
    isas = tuple(qkern.available_isas())
    start = qkern.get_isa()
    out = matmul.run_matmul(1, 1, 0, [(64, 128)], [1, 8], 0.0, isas)
    assert qkern.get_isa() == start  # the bench switches back
    head = next(line for line in out.splitlines() if line.startswith("| layer") and "ms |" in line
                and "implementation | " + isas[0] in line)
    assert [f"{i} ms" for i in isas] == re.findall(r"(\w+ ms)", head)
    rows = [r for r in out.splitlines() if r.startswith("| 64x128 | 1 | qkern int4 g128 fast |")]
    assert len(rows) == 1
    cells = rows[0].strip("|").split("|")[3:3 + len(isas)]
    assert all(float(c) > 0 for c in cells)  # every ISA timed at M = 1, scalar included
    m8 = next(r for r in out.splitlines() if r.startswith("| 64x128 | 8 | qkern int4 g128 fast |"))
    assert m8.strip("|").split("|")[3].strip() == "-"  # scalar: M = 1 only


def test_synthetic_llama_size():
    from qkern.tools.bench.decode_synth import CONFIG

    c = CONFIG
    n = (2 * c.vocab_size * c.hidden_size + c.num_hidden_layers
         * (4 * c.hidden_size ** 2 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
         + c.hidden_size)
    assert 336e6 < n < 338e6  # the 337M parameters, counted from the shapes


def test_decode_synth_runs_every_scheme():
    tiny = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=64)
    assert sum(p.numel() for p in synthetic_llama(config=tiny).parameters()) > 0
    out = run_decode_synth(1, 1, 2, llama_cpp=False, config=tiny)
    for name, _ in SCHEMES:
        row = next(r for r in out.splitlines() if r.startswith(f"| {name} |"))
        assert float(row.split("|")[4]) > 0  # decode tok/s


def test_python_m_qkern_bench():
    r = subprocess.run([sys.executable, "-m", "qkern.bench", "matmul", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--isa" in r.stdout
