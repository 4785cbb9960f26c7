"""``qkern bench matmul``: quantized Linear layers against the peers, in one run.

Every row times one (N out, K in) layer at batch M with the same threads: torch fp32
``F.linear``; torch's dynamic int8 Linear (fbgemm); ``aten._weight_int4pack_mm_for_cpu``
(torchao's int4 CPU path, group 128); ``aten._weight_int8pack_mm``; bitsandbytes' NF4 and
GPTQModel's AVX512-BF16 int4 kernel where those packages import (:mod:`.peers`: a missing one
is skipped with a line saying why); and qkern's QuantLinear kernels. Ratios are against fp32
in the same row block. For M = 1 the memory roofline is the layer's weight bytes divided by
the read bandwidth measured between the rows. ``--isa all``
times every qkern row on each kernel path the CPU has (scalar, avx2, avx512) and adds a table
with one column per path. For M = 1 a second table (:mod:`.sweep`, ``--sweep``) calls many
copies of each layer back to back, as a decode step does: weights cold, code warm.

torch's dynamic int8 Linear uses fbgemm's widest instructions (AVX-512 VNNI where the CPU has
them); ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` in the environment compares with its AVX2 path.
The header line shows which was in effect.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable

import torch
from torch import nn

from ... import available_isas, get_isa, set_isa, set_num_threads
from ...nn import QuantLinear
from ..weights import quant_linear_bytes
from . import peers
from .sweep import run_sweep
from .timing import Flusher, Probe, machine_line, time_alternating

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N out, K in)
AT4 = "aten int4 g128 bf16 (_weight_int4pack_mm)"  # the M = 1 reference of the sweep table
FP32 = "torch fp32 F.linear"  # the baseline of every "vs fp32" ratio
MS = [1, 8, 128, 512]


def _qkern(lin: nn.Linear, **kw):
    ql = QuantLinear.from_float(lin, **kw)
    return ql, quant_linear_bytes(ql), ql.kernel


_said: set[str] = set()


def _say(line: str) -> None:
    """Prints why a peer is missing, once per process."""
    if line not in _said:
        print(line, flush=True)
    _said.add(line)


def on_isa(isa: str, fn: Callable) -> Callable:
    """fn with qkern switched to ``isa`` for the call (the next row switches back)."""
    def call(x):
        set_isa(isa)
        return fn(x)
    return call


Impl = tuple[Callable, int, str]  # (call on x, weight bytes read per call, note)

QKERN_ROWS = (("qkern int4 g128 exact", {"fmt": "int4", "group_size": 128}),
              ("qkern int4 g128 fast", {"fmt": "int4", "group_size": 128, "mode": "fast"}),
              ("qkern W8A8 dynamic", {"fmt": "int8", "group_size": None, "act": "int8_dynamic"}),
              ("qkern W8A16", {"fmt": "int8", "group_size": None}),
              ("qkern nf4 b64", {"fmt": "nf4", "group_size": 64}),
              ("qkern nf4 b64 fast", {"fmt": "nf4", "group_size": 64, "mode": "fast"}),
              ("qkern int3 g128 fast", {"fmt": "int3", "group_size": 128, "mode": "fast"}),
              ("qkern int2 g128 fast", {"fmt": "int2", "group_size": 128, "mode": "fast",
                                        "symmetric": False}),
              ("qkern fp8_e4m3 per-channel", {"fmt": "fp8_e4m3", "group_size": None}),
              ("qkern binary", {"fmt": "binary", "group_size": None}),
              ("qkern ternary", {"fmt": "ternary", "group_size": None}))
#: the rows whose kernel has a path of its own at the amx level (the others run their avx512
#: kernel there, so an "[amx]" row of theirs would time it twice)
AMX_ROWS = frozenset({"qkern W8A8 dynamic", "qkern int4 g128 fast", "qkern nf4 b64 fast",
                      "qkern int3 g128 fast", "qkern int2 g128 fast", "qkern W8A16",
                      "qkern fp8_e4m3 per-channel", "qkern binary", "qkern ternary"})


def _peer_maker(make: Callable, first) -> Callable[[nn.Linear], Impl]:
    """The peer's builder; its first call returns ``first`` (built already, as the test that
    the peer runs here)."""
    pending = [first]

    def build(lin: nn.Linear) -> Impl:
        p = pending.pop() if pending else make(lin)
        return p.fn, p.nbytes, "peer"
    return build


def _qkern_maker(kw: dict, isa: str | None) -> Callable[[nn.Linear], Impl]:
    def build(lin: nn.Linear) -> Impl:
        ql, nb, kernel = _qkern(lin, **kw)
        if isa is None:
            return ql, nb, f"kernel={kernel}"
        return on_isa(isa, ql), nb, f"kernel={kernel}, isa={isa}"
    return build


def makers(lin: nn.Linear, isas: tuple[str, ...] = (),
           only: re.Pattern | None = None) -> dict[str, Callable[[nn.Linear], Impl]]:
    """name -> a builder of that implementation from an ``nn.Linear``: the peers that build
    here (``lin`` is tried once; a missing package or op is skipped with a line saying why),
    then qkern's rows, with ``isas`` once per ISA, named "... [isa]". ``only``: the names it
    matches (re.search), besides the fp32 baseline every ratio needs."""
    def wanted(name: str) -> bool:
        return only is None or only.search(name) is not None

    out: dict[str, Callable[[nn.Linear], Impl]] = {
        FP32: lambda m: (lambda x: nn.functional.linear(x, m.weight, m.bias),
                         m.weight.numel() * 4, "peer"),
    }
    for name, make in (("torch dynamic int8 (fbgemm)", peers.torch_dynamic_int8),
                       (AT4, peers.aten_int4),
                       ("aten int8 bf16 (_weight_int8pack_mm)", peers.aten_int8),
                       ("bitsandbytes nf4 b64 (matmul_4bit)", peers.bnb_nf4),
                       ("GPTQModel int4 g128 AVX512-BF16", peers.gptqmodel_int4)):
        if not wanted(name):  # a peer left out is not built either
            continue
        try:
            out[name] = _peer_maker(make, make(lin))
        except ImportError as e:  # an optional package (bitsandbytes, gptqmodel) is missing
            _say(f"  {name}: skipped (not importable: {e})")
        except (RuntimeError, AttributeError) as e:  # op missing or failing to build here
            _say(f"  {name}: unavailable ({str(e).strip().splitlines()[0][:100]})")
    for name, kw in QKERN_ROWS:
        if not isas and wanted(name):
            out[name] = _qkern_maker(kw, None)
        for isa in isas:
            if (isa != "amx" or name in AMX_ROWS) and wanted(f"{name} [{isa}]"):
                out[f"{name} [{isa}]"] = _qkern_maker(kw, isa)
    return out


def implementations(lin: nn.Linear, isas: tuple[str, ...] = (),
                    only: re.Pattern | None = None) -> dict[str, Impl]:
    """name -> (callable on x, weight bytes read per call, note), every row built once."""
    return {name: build(lin) for name, build in makers(lin, isas, only).items()}


def isa_columns(rows: list[tuple], isas: tuple[str, ...]) -> list[str]:
    """A second table: each qkern row's ms per ISA side by side (and AVX-512 vs AVX2)."""
    ms: dict[tuple, dict[str, float]] = {}
    for n, k, m, name, t, *_ in rows:
        if name.endswith("]") and " [" in name:
            base, isa = name[:-1].rsplit(" [", 1)
            ms.setdefault((n, k, m, base), {})[isa] = t
    head = "| layer (N x K) | M | implementation | " + " | ".join(f"{i} ms" for i in isas)
    both = "avx2" in isas and "avx512" in isas
    lines = ["", "**Per ISA** (the same rows, one column per kernel path):", "",
             head + (" | avx512 vs avx2 |" if both else " |"),
             "|---|--:|---|" + "--:|" * (len(isas) + both)]
    for (n, k, m, base), by in ms.items():
        cells = " | ".join(f"{1e3 * by[i]:.3f}" if i in by else "-" for i in isas)
        ratio = (f" | {by['avx2'] / by['avx512']:.2f}x |"
                 if both and "avx2" in by and "avx512" in by else (" | - |" if both else " |"))
        lines.append(f"| {n}x{k} | {m} | {base} | {cells}{ratio}")
    return lines


def run_matmul(threads: int, repeats: int, warmup: int, shapes, ms, settle_s: float,
               isas: tuple[str, ...] = (), sweep: str = "also",
               only: re.Pattern | None = None) -> str:
    """The table (and with ``isas``, one qkern row per ISA plus a per-ISA table). The scalar
    path is timed for M = 1 only (a 4096 x 4096 M = 512 product takes it tens of seconds).
    ``sweep``: "also" adds the M = 1 back-to-back table (:mod:`.sweep`), "only" prints just
    that one, "no" leaves it out. ``only``: the rows whose name it matches (and fp32)."""
    start_isa = get_isa()
    torch.set_num_threads(threads)
    set_num_threads(threads)
    torch.manual_seed(0)
    probe = Probe.make(256 << 20)
    if sweep == "only":
        lines = [machine_line(threads), *run_sweep(shapes, lambda lin: makers(lin, isas, only),
                                                   repeats, settle_s, probe, AT4)]
        set_isa(start_isa)
        return "\n".join(lines)
    flush = Flusher(settle_s)
    lines = [
        machine_line(threads),
        "",
        "| layer (N x K) | M | implementation | ms | vs fp32 | GB/s weights | % of read bw |"
        " note |",
        "|---|--:|---|--:|--:|--:|--:|---|",
    ]
    rows: list[tuple] = []
    for n, k in shapes:
        lin = nn.Linear(k, n)
        impls = implementations(lin, isas, only)
        for m in ms:
            x = torch.randn(m, k)
            calls = {name: (lambda f=f: f(x)) for name, (f, _, _) in impls.items()
                     if m == 1 or not name.endswith("[scalar]")}
            with torch.no_grad():
                med, _ = time_alternating(calls, repeats, warmup, probe, flush, budget_s=20.0)
            for name, (_, nb, note) in impls.items():
                if name in med:
                    rows.append((n, k, m, name, med[name], med[FP32], nb, note))
            print(f"  {n}x{k} M={m}: " + ", ".join(f"{a} {1e3 * t:.2f} ms"
                                                   for a, t in med.items()), flush=True)
    read_gbs = probe.read_gbs()
    for n, k, m, name, t, t32, nb, note in rows:
        gbs = nb / t / 1e9
        roof = f"{100 * gbs / read_gbs:.0f} %" if m == 1 else ""
        lines.append(f"| {n}x{k} | {m} | {name} | {1e3 * t:.3f} | {t32 / t:.2f}x | {gbs:.1f} "
                     f"| {roof} | {note} |")
    lines.insert(1, f"**Roofline (same run)** read bandwidth {read_gbs:.1f} GB/s (`sum` of "
                    f"{probe.nbytes >> 20} MiB); weight bytes = the layer's stored weights "
                    "(packed codes + scales).")
    fbgemm = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "default (widest)")
    which = f"ISAs {', '.join(isas)} (one row each)" if isas else f"ISA {start_isa}"
    lines.insert(2, f"qkern {which}; fbgemm instructions {fbgemm}; median of "
                    "alternating repeats, caches flushed before each call.")
    if isas:
        set_isa(start_isa)
        lines += isa_columns(rows, isas)
    if sweep == "also" and 1 in ms:
        lines += run_sweep(shapes, lambda lin: makers(lin, isas, only), repeats, settle_s,
                           Probe(probe.src, probe.dst), AT4)
        set_isa(start_isa)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qkern bench matmul",
                                description="quantized Linear layers vs torch peers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="one small shape, M = 1 and 8")
    p.add_argument("--settle-ms", type=float, default=10.0)
    p.add_argument("--isa", default=None,
                   help="qkern kernel paths to time, each as its own rows: 'all' (every ISA "
                        "this CPU has) or a comma list of scalar, avx2, avx512, amx (default: "
                        "the active one only; amx rows only for the kernels with an AMX path: "
                        "W8A8 and the fast modes of int4, nf4, int3, int2)")
    p.add_argument("--sweep", choices=("also", "only", "no"), default="also",
                   help="the M = 1 table of layers called back to back (weights cold, code "
                        "warm, as in decode): after the main table (also), alone (only) or not")
    p.add_argument("--only", default=None, metavar="REGEX",
                   help="time only the rows whose name matches (re.search; the fp32 baseline "
                        "always runs), e.g. 'W8A8|fbgemm'")
    p.add_argument("--ms", default=None, metavar="M,M,...",
                   help="the batch sizes M (default 1,8,128,512; --quick: 1,8)")
    a = p.parse_args(argv)
    only = None
    if a.only is not None:
        try:
            only = re.compile(a.only)
        except re.error as e:
            p.error(f"--only: not a regular expression ({e})")
    isas: tuple[str, ...] = ()
    if a.isa is not None:
        have = available_isas()
        isas = tuple(have) if a.isa == "all" else tuple(i.strip() for i in a.isa.split(","))
        bad = [i for i in isas if i not in ("scalar", "avx2", "avx512", "amx")]
        if bad:
            p.error(f"--isa: unknown {bad}; use 'all' or a comma list of scalar, avx2, avx512, "
                    "amx")
        missing = [i for i in isas if i not in have]
        if missing:
            p.error(f"--isa: this CPU cannot run {missing} (it has {', '.join(have)})")
    shapes, ms = (SHAPES, MS) if not a.quick else ([(1024, 1024)], [1, 8])
    if a.ms is not None:
        try:
            ms = [int(v) for v in a.ms.split(",")]
        except ValueError:
            p.error(f"--ms: a comma list of positive integers, got {a.ms!r}")
        if not ms or min(ms) < 1:
            p.error(f"--ms: a comma list of positive integers, got {a.ms!r}")
    t0 = time.perf_counter()
    print(run_matmul(a.threads, a.repeats if not a.quick else 2, a.warmup, shapes, ms,
                     a.settle_ms / 1e3, isas, a.sweep, only))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0
