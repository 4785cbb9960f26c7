"""``qkern bench overhead``: what one call costs beyond its arithmetic, from Python.

A decode step runs dozens of GEMVs per token; on a small layer the call itself (Python, the
torch dispatcher, checks, allocation, waking the thread pool) is most of the time. Every row
calls the same tiny layer (``--out`` x ``--in``, M = 1, weights in cache) back to back and
reports the median microseconds per call over ``--calls`` calls:

- ``QuantLinear`` (int4 g128 fast, W8A8, nf4): the module as users call it, under
  ``torch.inference_mode`` (the per-call fast path: ``Kernel.plan``);
- the same kernels through their torch ops (``torch.ops.qkern.gemm_w4`` ...): what
  ``torch.compile`` / autograd see;
- the kernel's raw binding alone (``qkern._C.gemm_w4_raw`` on preallocated tensors): the floor;
- torch peers on the same shape: ``F.linear`` (fp32) and ``aten._weight_int4pack_mm_for_cpu``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ... import _C, set_num_threads
from ...nn import QuantLinear
from .peers import aten_int4
from .timing import machine_line


def _per_call_us(fn: Callable[[], object], calls: int, rounds: int = 7) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def _rows(n: int, k: int) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    x = torch.randn(1, k)
    w4 = QuantLinear.from_float(lin, fmt="int4", group_size=128, mode="fast")
    w8 = QuantLinear.from_float(lin, fmt="int8", group_size=None, act="int8_dynamic")
    nf4 = QuantLinear.from_float(lin, fmt="nf4", group_size=64)
    b4 = w4.packed_buffers()
    p4, s4 = b4["w4_packed"], b4["w4_scales"]
    y = torch.empty(1, n)
    ops = torch.ops.qkern
    rows: dict[str, Callable[[], object]] = {
        "QuantLinear int4 g128 fast": lambda: w4(x),
        "QuantLinear W8A8 dynamic": lambda: w8(x),
        "QuantLinear nf4 b64": lambda: nf4(x),
        "torch.ops.qkern.gemm_w4 (the op)": lambda: ops.gemm_w4(x, p4, s4, None, lin.bias, n, k,
                                                                128, 1),
        "qkern._C.gemm_w4_raw (binding only)": lambda: _C.gemm_w4_raw(
            x.data_ptr(), 1, p4.data_ptr(), s4.data_ptr(), 0, lin.bias.data_ptr(), n, k, 128, 1,
            y.data_ptr(), 0),
        "torch F.linear fp32": lambda: nn.functional.linear(x, lin.weight, lin.bias),
    }
    try:
        peer = aten_int4(lin)
        rows["aten _weight_int4pack_mm_for_cpu (bf16)"] = lambda: peer.fn(x)
    except (RuntimeError, AttributeError) as e:  # op missing in this torch build
        print(f"  aten int4: unavailable ({str(e).splitlines()[0][:80]})")
    return rows


def run_overhead(threads: int, n: int, k: int, calls: int) -> str:
    torch.set_num_threads(threads)
    set_num_threads(threads)
    rows = _rows(n, k)
    with torch.inference_mode():
        us = {name: _per_call_us(fn, calls) for name, fn in rows.items()}
    lines = [machine_line(threads), "",
             f"Per-call cost of a {n} x {k} layer at M = 1 (weights in cache), median of 7 "
             f"rounds of {calls} back-to-back calls, under torch.inference_mode.", "",
             "| call | us per call |", "|---|--:|"]
    lines += [f"| {name} | {t:.1f} |" for name, t in us.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qkern bench overhead",
                                description="per-call cost of a tiny layer, qkern vs torch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=int, default=64, help="out_features of the layer")
    p.add_argument("--in", dest="inp", type=int, default=128,
                   help="in_features (a multiple of 128)")
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args(argv)
    if a.threads < 1 or a.out < 1 or a.calls < 1 or a.inp < 128 or a.inp % 128:
        p.error("--threads, --out, --calls must be >= 1 and --in a positive multiple of 128")
    print(run_overhead(a.threads, a.out, a.inp, a.calls))
    return 0
