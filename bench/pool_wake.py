"""Does the thread pool's worker join a call that comes after a pause? A 4096 x 4096 float32
per-channel int8 quantize (``torch.ops.qkern.quantize_affine_dynamic_out``, 64 MiB read,
16 MiB written) timed cold: the bench's Flusher (a read of twice the last-level cache), then
``--settle-ms`` idle (the worker has gone to sleep), then the call. Each setting runs in its
own process: 1 thread, and 2 threads with the workers kept off the caller's CPU (the
default) and with ``QKERN_PIN_WORKERS=0``. A worker that joins late leaves a call at the
one-thread time, so a bimodal spread (half the calls at the 2-thread time, half at the
1-thread time) is the symptom. Beside it, torch's ``copy_`` of the same bytes (half read,
half written), timed the same way.

    THP_MEM_ALLOC_ENABLE=1 PYTHONPATH=python python bench/pool_wake.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch, qkern
from qkern import formats as F
from qkern.tools.bench.timing import Flusher
threads, settle, repeats = int(sys.argv[1]), float(sys.argv[2]) / 1e3, int(sys.argv[3])
torch.set_num_threads(threads)
qkern.set_num_threads(threads)
w = torch.randn(4096, 4096)
flat = w.view(-1)
q = qkern.quantize(w, "int8", granularity="channel")
codes, scale, none = q.codes.view(-1), q.scale.view(-1), torch.empty(0, dtype=torch.int32)
src = torch.randn(w.numel() * 5 // 8)  # the quantize's 84 MB, half read and half written
dst = torch.empty_like(src)
flush = Flusher(settle)  # a read of twice the last-level cache, then `settle` idle
calls = {
    "quantize": lambda: torch.ops.qkern.quantize_affine_dynamic_out(
        flat, 4096, -128, 127, F.SCALE_ABSMAX, 127.0, 0, 0, 0, 0.0, 0, codes, scale, none),
    "copy_": lambda: dst.copy_(src),
}
out = {k: [] for k in calls}
for _ in range(repeats):
    for name, f in calls.items():
        flush()
        t0 = time.perf_counter()
        f()
        out[name].append((time.perf_counter() - t0) * 1e3)
print(json.dumps(out))
"""


def _run(threads: int, pin: bool, settle_ms: float, repeats: int) -> dict:
    env = {**os.environ, "QKERN_PIN_WORKERS": "1" if pin else "0"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(settle_ms),
                          str(repeats)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settle-ms", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=31)
    a = p.parse_args()
    print(f"4096x4096 int8 per-channel quantize, cold after {a.settle_ms:g} ms idle, "
          f"{a.repeats} calls per row, ms (10th / 50th / 90th percentile)\n")
    print("| setting | quantize p10 | p50 | p90 | copy_ p50 | quantize p50 vs copy_ |")
    print("|---|--:|--:|--:|--:|--:|")
    for label, threads, pin in (("1 thread", 1, True), ("2 threads, workers kept off the "
                                                         "caller's CPU (default)", 2, True),
                                ("2 threads, QKERN_PIN_WORKERS=0", 2, False)):
        r = _run(threads, pin, a.settle_ms, a.repeats)
        qt, cp = r["quantize"], r["copy_"]
        print(f"| {label} | {_pct(qt, 0.1):.2f} | {_pct(qt, 0.5):.2f} | {_pct(qt, 0.9):.2f} | "
              f"{_pct(cp, 0.5):.2f} | {_pct(cp, 0.5) / _pct(qt, 0.5) * 100:.0f} % |")


if __name__ == "__main__":
    main()
