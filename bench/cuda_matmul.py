"""qkern's CUDA matmuls beside torch's own CUDA ops, one run (issue 14's CUDA item).

    python bench/cuda_matmul.py                  # on a machine with an NVIDIA GPU
    python bench/cuda_matmul.py --device cpu --quick   # a smoke run of this script's logic

Rows per shape (N x K) and M: torch fp16 ``F.linear`` (the baseline of the ratio column), torch
int4 (``aten._weight_int4pack_mm``, bf16, g128: torchao's tinygemm path), torch int8
(``torch._int_mm`` with per-row int8 activations quantized in the call: needs M > 16 on CUDA),
and qkern's QuantLinear moved to the GPU: int4 g128 exact / fast, nf4 b64, W8A8 dynamic, W8A16.

Timing: CUDA events around sweeps over copies of the layer whose weights add up to twice the
GPU's L2 (so they come from HBM, as in a model's decode step), median of ``--repeats`` sweeps
after a warm-up, per call. "eager" is the Python call as users make it (launch overhead
included); "graph" replays the same sweep captured in a CUDA graph (kernel time; "-" where
capture fails, e.g. an op that reads a flag back to the host). The read-bandwidth probe (a
``sum`` of 1 GiB) runs in the same process. Every implementation's output is first checked
against ``x @ W^T`` of its own dequantized weight (float64): a wrong one is marked WRONG and not
timed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from qkern.nn import QuantLinear
from qkern.tools.weights import quant_linear_bytes

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
MS = [1, 16, 512]
QKERN = (("qkern int4 g128 exact", dict(fmt="int4", group_size=128)),
         ("qkern int4 g128 fast", dict(fmt="int4", group_size=128, mode="fast")),
         ("qkern nf4 b64", dict(fmt="nf4", group_size=64)),
         ("qkern W8A8 dynamic", dict(fmt="int8", group_size=None, act="int8_dynamic")),
         ("qkern W8A16", dict(fmt="int8", group_size=None)))


class Timer:
    def __init__(self, dev: torch.device):
        self.dev = dev

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def run(self, fn, iters: int) -> float:
        """Seconds per ``fn()`` call over ``iters`` calls."""
        if self.dev.type != "cuda":
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) / iters
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / iters


def fp16_peer(lin: nn.Linear, dev):
    w = lin.weight.detach().to(dev, torch.float16)
    return (lambda x: nn.functional.linear(x.to(torch.float16), w)), w.numel() * 2, \
        lambda: w.double()


def int4_peer(lin: nn.Linear, dev, group: int = 128):
    """torch's CUDA int4 (tinygemm): uint4 per group, (K/g, N, 2) bf16 scales and zeros."""
    w = lin.weight.detach().float()
    n, k = w.shape
    wg = w.view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(dev)
    packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
    zeros = lo + 8 * scale  # dequantized as (q - 8) * scale + zero
    sz = torch.stack([scale, zeros], -1).transpose(0, 1).contiguous().to(dev, torch.bfloat16)
    s, z = sz[..., 0].t().double(), sz[..., 1].t().double()
    deq = (q.to(dev).double() - 8) * s.repeat_interleave(group, 1) + z.repeat_interleave(group, 1)
    return (lambda x: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, group, sz),
            n * k // 2 + sz.numel() * 2, lambda: deq)


def int8_peer(lin: nn.Linear, dev):
    """torch._int_mm with int8 weights per output channel and int8 activations per row."""
    w = lin.weight.detach().float()
    sw = (w.abs().amax(1) / 127).clamp_min(1e-8)
    q = (w / sw[:, None]).round().clamp(-127, 127).to(torch.int8)
    qt, sw = q.t().contiguous().to(dev), sw.to(dev)

    def call(x):
        sx = (x.abs().amax(1, keepdim=True) / 127).clamp_min(1e-8)
        xq = (x / sx).round().clamp(-127, 127).to(torch.int8)
        return torch._int_mm(xq, qt).float() * sx * sw
    return call, q.numel() + sw.numel() * 4, lambda: q.to(dev).double() * sw.double()[:, None]


def qkern_impl(lin: nn.Linear, dev, kw: dict):
    ql = QuantLinear.from_float(lin, **kw)
    deq = ql.dequantize_weight().double()
    ql = ql.to(dev)
    return (lambda x, ql=ql: ql(x)), quant_linear_bytes(ql), lambda: deq.to(dev)


def check(fn, ref, x) -> str:
    """'' if fn(x) is x @ W^T of its own weights W within 2 % of the output's norm (the fast
    and int8-activation paths quantize x: ~0.5 %)."""
    y = fn(x).double()
    want = x.double() @ ref().t()
    err = (y - want).norm() / want.norm().clamp_min(1e-30)
    return "" if err < 0.02 else f"WRONG (relative error {err:.3g})"


def time_impl(build, dev, x, copies: int, repeats: int, timer: Timer):
    fns = [build()[0] for _ in range(copies)]

    def sweep():
        for f in fns:
            f(x)
    sweep()
    timer.sync()
    eager = statistics.median(timer.run(sweep, 1) for _ in range(repeats)) / copies
    graph = None
    if dev.type == "cuda":
        try:
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                sweep()
            torch.cuda.current_stream(dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                sweep()
            g.replay()
            timer.sync()
            graph = statistics.median(timer.run(g.replay, 1) for _ in range(repeats)) / copies
        except Exception as e:  # noqa: BLE001 - the row says capture failed and why
            print(f"    graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
    return eager, graph


def read_gbs(dev, timer: Timer, nbytes: int) -> float:
    buf = torch.ones(nbytes // 4, device=dev)
    buf.sum()
    timer.sync()
    t = statistics.median(timer.run(buf.sum, 1) for _ in range(7))
    return nbytes / t / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="one small shape, M = 1 and 16")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/cuda_matmul.py: no CUDA device here (torch.cuda.is_available() "
                         "is False); use --device cpu for a smoke run of the script")
    timer = Timer(dev)
    shapes, ms = ([(256, 512)], [1, 16]) if a.quick else (SHAPES, MS)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        l2 = props.L2_cache_size
        print(f"**Device** {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; "
              f"torch {torch.__version__}")
    else:
        l2 = 32 << 20
    bw = read_gbs(dev, timer, (1 << 30) if not a.quick else (64 << 20))
    print(f"**Read bandwidth** (sum of {'1 GiB' if not a.quick else '64 MiB'}, same run): "
          f"{bw:.0f} GB/s\n")
    print("| N x K | M | implementation | eager ms | graph ms | vs fp16 (graph, else eager) | "
          "GB/s weights | % of read bw | note |")
    print("|---|--:|---|--:|--:|--:|--:|--:|---|")
    torch.manual_seed(0)
    for n, k in shapes:
        lin = nn.Linear(k, n, bias=False)
        makers = {"torch fp16 F.linear": lambda: fp16_peer(lin, dev),
                  "torch int4 g128 (_weight_int4pack_mm, bf16)": lambda: int4_peer(lin, dev),
                  "torch int8 (_int_mm, dynamic)": lambda: int8_peer(lin, dev)}
        for name, kw in QKERN:
            makers[name] = (lambda kw: lambda: qkern_impl(lin, dev, kw))(kw)
        for m in ms:
            x = torch.randn(m, k, device=dev)
            base = None
            for name, build in makers.items():
                if name.startswith("torch int8") and m <= 16 and dev.type == "cuda":
                    print(f"| {n}x{k} | {m} | {name} | - | - | - | - | - | _int_mm needs M > 16 |")
                    continue
                try:
                    fn, nbytes, ref = build()
                    bad = check(fn, ref, x)
                except Exception as e:  # noqa: BLE001 - a peer op missing in this torch
                    print(f"| {n}x{k} | {m} | {name} | - | - | - | - | - | unavailable: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:80]} |")
                    continue
                if bad:
                    print(f"| {n}x{k} | {m} | {name} | - | - | - | - | - | {bad} |")
                    continue
                copies = max(1, min(64, math.ceil(2 * l2 / nbytes)))
                eager, graph = time_impl(build, dev, x, copies, a.repeats, timer)
                t = graph if graph is not None else eager
                base = t if name == "torch fp16 F.linear" else base
                vs = f"{base / t:.2f}x" if base else "-"
                gbs = nbytes / t / 1e9
                gms = f"{1e3 * graph:.4f}" if graph is not None else "-"
                print(f"| {n}x{k} | {m} | {name} | {1e3 * eager:.4f} | {gms} | {vs} | "
                      f"{gbs:.0f} | {100 * gbs / bw:.0f} % | {copies} copies |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
