"""The speed benches' command lines (not timed: the figures are the bench's job): ``--isa``,
the per-ISA table, the synthetic-Llama decode bench and ``python -m qkern.bench``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkern
from qkern.models.llama import LlamaConfig
from qkern.tools.bench import matmul
from qkern.tools.bench.decode_synth import SCHEMES, run_decode_synth, synthetic_llama
from qkern.tools.bench.sweep import copies_for, rounds_for, run_sweep
from qkern.tools.bench.timing import Probe, time_alternating


def test_isa_flag_errors(capsys):
    with pytest.raises(SystemExit) as e:
        matmul.main(["--quick", "--isa", "sse9"])
    assert e.value.code == 2 and "unknown ['sse9']" in capsys.readouterr().err


def test_only_and_ms_pick_the_rows_and_batch_sizes(capsys):
    assert matmul.main(["--quick", "--only", "W8A8|fbgemm", "--ms", "8", "--sweep", "no"]) == 0
    out = capsys.readouterr().out
    names = {r.split("|")[3].strip() for r in out.splitlines() if r.startswith("| 1024x1024 |")}
    assert names == {"torch fp32 F.linear", "torch dynamic int8 (fbgemm)", "qkern W8A8 dynamic"}
    assert {r.split("|")[2].strip() for r in out.splitlines()
            if r.startswith("| 1024x1024 |")} == {"8"}
    for bad, what in ((["--only", "("], "--only: not a regular expression"),
                      (["--ms", "0"], "--ms: a comma list"), (["--ms", "x"], "--ms: a comma list")):
        with pytest.raises(SystemExit) as e:
            matmul.main(["--quick", *bad])
        assert e.value.code == 2 and what in capsys.readouterr().err


def test_per_isa_table_has_a_column_per_isa():
    isas = tuple(qkern.available_isas())
    start = qkern.get_isa()
    out = matmul.run_matmul(1, 1, 0, [(64, 128)], [1, 8], 0.0, isas, sweep="no")
    assert qkern.get_isa() == start  # the bench switches back
    head = next(line for line in out.splitlines() if line.startswith("| layer") and "ms |" in line
                and "implementation | " + isas[0] in line)
    assert [f"{i} ms" for i in isas] == re.findall(r"(\w+ ms)", head)
    def cells(name):
        rows = [r for r in out.splitlines() if r.startswith(f"| 64x128 | 1 | {name} |")]
        assert len(rows) == 1
        return dict(zip(isas, rows[0].strip("|").split("|")[3:3 + len(isas)]))

    # every ISA timed at M = 1, scalar included; amx only for the kernels with an AMX path
    for name in ("qkern int4 g128 fast", "qkern W8A8 dynamic", "qkern nf4 b64 fast",
                 "qkern int3 g128 fast", "qkern int2 g128 fast"):
        assert all(float(c) > 0 for c in cells(name).values())
    if "amx" in isas:
        assert cells("qkern int4 g128 exact")["amx"].strip() == "-"
    m8 = next(r for r in out.splitlines() if r.startswith("| 64x128 | 8 | qkern int4 g128 fast |"))
    assert m8.strip("|").split("|")[3].strip() == "-"  # scalar: M = 1 only


def test_sweep_copies_cover_twice_the_cache():
    # the timed copies (all but the wake-up one) cover twice the cache
    assert copies_for(8 << 20, cache=32 << 20) == 9
    assert copies_for(100 << 20, cache=32 << 20) == 3  # at least 2 timed: one evicts the other
    assert copies_for(1000, cache=32 << 20, most=64) == 64
    assert [rounds_for(c, 24) for c in (2, 3, 5, 9, 25, 64)] == [24, 12, 6, 3, 1, 1]


def test_sweep_and_flush_sizes_are_capped(monkeypatch):
    # a CPU reporting a 480 MiB L3 (an Intel Xeon 6 VM): the flush and each implementation's
    # sweep read 512 MiB, not 960 (the sweep of every implementation's copies ran out of
    # 24 GiB there)
    from qkern.tools.bench import sweep, timing
    monkeypatch.setattr(timing, "l3_bytes", lambda: 480 << 20)
    assert timing.evict_bytes() == 512 << 20
    assert sweep.copies_for(64 << 20) == 8 + 1
    monkeypatch.setattr(timing, "l3_bytes", lambda: 32 << 20)
    assert timing.evict_bytes() == 64 << 20 and sweep.copies_for(8 << 20) == 9


def test_sweep_copies_fit_in_memory():
    from qkern.tools.bench.sweep import fit_memory
    want, nbytes = {"a": 9, "b": 17}, {"a": 64 << 20, "b": 32 << 20}  # 1120 MiB in all
    assert fit_memory(want, nbytes, 4 << 30) == want
    got = fit_memory(want, nbytes, 1 << 30)  # half: 512 MiB
    assert sum(got[n] * nbytes[n] for n in got) <= 512 << 20 and got == {"a": 4, "b": 7}
    assert fit_memory(want, nbytes, 1 << 20) == {"a": 3, "b": 3}  # never below 3


def test_sweep_table_times_every_implementation():
    calls = {"a": 0, "b": 0}

    def makers(lin):
        def build(name, nb):
            def make(_lin):
                def f(x):
                    calls[name] += 1
                    return x @ lin.weight.T
                return f, nb, "note"
            return make
        return {"a": build("a", 1 << 20), "b": build("b", 4 << 20)}

    probe = Probe.make(1 << 20)
    lines = run_sweep([(32, 64)], makers, 3, 0.0, probe, "a", most=4)
    rows = {r.split("|")[2].strip(): r for r in lines if r.startswith("| 32x64 |")}
    assert set(rows) == {"a", "b"}
    for name in ("a", "b"):
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert cells[2] == "4"  # copies, capped by most
        assert float(cells[3]) > 0
        # 1 warm-up sweep over the 4 copies, then 3 times (the wake-up call, then rounds over
        # the 3 other copies until >= 24 calls: 8 rounds)
        assert calls[name] == 4 + 3 * (1 + 8 * 3)
    assert rows["a"].split("|")[5].strip() == "1.00x"
    assert len(probe.sum_s) == 3
    # 3 timed copies of 1-4 MiB cover less than twice any real last-level cache: said so
    assert any(line.startswith("Not cold for every row: the timed copies of 2 ") for line in lines)


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
        assert float(row.split("|")[8]) > 0  # prefill tok/s


def test_python_m_qkern_bench():
    r = subprocess.run([sys.executable, "-m", "qkern.bench", "matmul", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--isa" in r.stdout


def test_cuda_bench_script_runs_on_the_host():
    """bench/cuda_matmul.py (the GPU check's bench) on the CPU: every qkern row is checked
    against x @ W^T of its own dequantized weight in float64 before it is timed, so a row with
    figures passed that check; on a machine without a GPU the CUDA default exits saying so."""
    script = Path(__file__).resolve().parents[1] / "bench" / "cuda_matmul.py"
    env = {**os.environ, "PYTHONPATH": str(Path(qkern.__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick",
                          "--repeats", "1"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [r for r in out.stdout.splitlines() if r.startswith("| 256x512 |")]
    assert "WRONG" not in out.stdout
    timed = [r for r in rows if "qkern" in r and "copies" in r]
    assert len(timed) == 10  # 5 qkern rows x M = 1, 16, all checked and timed
    if not torch.cuda.is_available():
        gone = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert gone.returncode != 0 and "no CUDA device here" in gone.stderr


def test_alternating_hands_out_each_rounds_samples():
    calls = []
    impls = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    fake = iter(range(1, 100))
    got: dict[str, list[float]] = {}
    med, reps = time_alternating(impls, 4, 0, sample=lambda n: float(next(fake)),
                                 samples_out=got)
    assert reps == 4 and sorted(got) == ["a", "b", "c"]
    # round r starts at implementation r % 3 (cyclic order), one sample each per round
    assert got == {"a": [1, 6, 8, 10], "b": [2, 4, 9, 11], "c": [3, 5, 7, 12]}
    assert med == {n: (s[1] + s[2]) / 2 for n, s in got.items()}


def test_gemv_cold_sweep_prints_paired_ratios():
    script = Path(__file__).resolve().parents[1] / "bench" / "gemv_cold_sweep.py"
    env = {**os.environ, "PYTHONPATH": str(Path(qkern.__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, str(script), "--shapes",
                          "64x256", "--span-mib", "1", "--repeats", "3", "--bits", "4,2",
                          "--threads", "1"], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    rows = [r for r in out.splitlines() if r.startswith("| 64x256 | qkern int2")]
    assert len(rows) == 1, out
    # vs qkern int4: "median (lower-upper quartile)" of the rounds' ratios, then the byte ratio
    m = re.search(r"\| ([\d.]+)x \(([\d.]+)-([\d.]+)\) \| ([\d.]+)x \|$", rows[0])
    assert m and float(m[2]) <= float(m[1]) <= float(m[3]), rows[0]
