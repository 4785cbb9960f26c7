"""Where a decode step's time goes: the synthetic 337M Llama of ``qkern bench decode --model
synthetic-337m`` quantized to int4 g128 fast, its 29 QuantLinear layers called alone in model
order (M = 1, the weights streamed as in a step) beside whole greedy decode steps (``generate``,
KV cache), alternating, median of ``--repeats``. The difference is everything else a step
does: the model's torch ops, its Python, and anything that slows the GEMVs inside a step
(another thread pool's spinning workers on the same cores). Run it with and without
``OMP_WAIT_POLICY=PASSIVE`` (torch's OpenMP workers sleep at once instead of spinning) to see
that last part, or give torch one thread (``--torch-threads 1``):

    PYTHONPATH=python python bench/decode_split.py
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python bench/decode_split.py
    PYTHONPATH=python python bench/decode_split.py --torch-threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from qkern import set_num_threads
from qkern.nn import QuantLinear
from qkern.tools.bench.decode_synth import synthetic_llama
from qkern.tools.bench.schemes import build
from qkern.tools.bench.timing import machine_line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--torch-threads", type=int, default=None, help="default: --threads")
    a = p.parse_args()
    torch.set_num_threads(a.torch_threads or a.threads)
    set_num_threads(a.threads)
    model = build(synthetic_llama(), {"fmt": "int4", "group_size": 128, "mode": "fast"})
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    xs = {m.in_features: torch.randn(1, m.in_features) for m in layers}
    prompt = torch.randint(0, model.config.vocab_size, (16,),
                           generator=torch.Generator().manual_seed(1))
    gemv_s, step_s = [], []
    with torch.no_grad():
        model.generate(prompt, 4)  # warm-up
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for _ in range(a.tokens):
                for m in layers:
                    m(xs[m.in_features])
            gemv_s.append((time.perf_counter() - t0) / a.tokens)
            t0 = time.perf_counter()
            model.generate(prompt, a.tokens)
            step_s.append((time.perf_counter() - t0) / a.tokens)
    g, s = statistics.median(gemv_s), statistics.median(step_s)
    print(machine_line(a.threads) + f"; torch threads {torch.get_num_threads()}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}")
    print(f"{len(layers)} int4 g128 fast layers alone: {1e3 * g:.2f} ms per token; decode: "
          f"{1e3 * s:.2f} ms per token ({1 / s:.1f} tok/s; prompt of 16 included); the rest: "
          f"{1e3 * (s - g):.2f} ms ({100 * (s - g) / s:.0f} %)")


if __name__ == "__main__":
    main()
