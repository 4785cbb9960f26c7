"""Calibration + GPTQ wall time of the synthetic Llama (python/qkern/tools/bench/decode_synth.py
``synthetic_llama``: 337M parameters, 4 blocks of width 2048 / 5632) in one process and on 2
gloo ranks of this machine (docs/distributed.md).

Three runs, each a fresh process group of subprocesses (the timings are of
``qkern.quantize_model`` alone, between two barriers, on rank 0):

- 1 process, 1 thread;
- 1 process, 2 threads (torch's intra-op threads: the fair single-process baseline on 2 cores);
- 2 ranks x 1 thread (data-parallel calibration, layer-parallel GPTQ).

Besides the wall time: each rank's CPU seconds (``time.process_time``: all its threads; on a
busy machine the contention-free measure of the work and of the critical path) and the GPTQ
CPU seconds of the layers each rank quantized itself (the layer-parallel part; the rest is forward
passes, Gram matrices and broadcasts). GPTQConfig(bits=4, group_size=128), calibration:
``--samples`` random token sequences of ``--seqlen`` tokens (seed 0).

Run: PYTHONPATH=python python bench/distributed_gptq.py [--samples 8] [--seqlen 64]
     [--layers 4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

import qkern
from qkern.quantization.algorithms.gptq import GPTQQuantizer
from qkern.tools.bench.decode_synth import CONFIG, synthetic_llama

RUNS = (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2),
        ("2 ranks x 1 thread", 2, 1))


def worker(args) -> None:
    """One rank (or the single process): times quantize_model, prints JSON on rank 0."""
    torch.set_num_threads(args.threads)
    qkern.set_num_threads(args.threads)
    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
        rank, world = dist.get_rank(), dist.get_world_size()
    model = synthetic_llama(config=replace(CONFIG, num_hidden_layers=args.layers))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, CONFIG.vocab_size, (1, args.seqlen), generator=g)
             for _ in range(args.samples)]
    cfg = qkern.GPTQConfig(bits=4, group_size=128)
    own = [0.0]  # GPTQ seconds of the layers this rank quantized itself (layer-parallel)
    inner = GPTQQuantizer.quantize_layer

    def timed(self, *a, **k):
        t = time.process_time()
        try:
            return inner(self, *a, **k)
        finally:
            own[0] += time.process_time() - t

    GPTQQuantizer.quantize_layer = timed
    if world > 1:
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    qkern.quantize_model(model, cfg, calib, progress=False)
    cpu = time.process_time() - c0
    if world > 1:
        dist.barrier()
    wall = time.perf_counter() - t0
    mine = torch.tensor([[own[0], cpu]], dtype=torch.float64)
    if world > 1:
        parts = [torch.zeros(1, 2, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(parts, mine)
        mine = torch.cat(parts)
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"wall": wall, "gptq": mine[:, 0].tolist(),
                          "cpu": mine[:, 1].tolist()}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, world: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--samples",
           str(args.samples), "--seqlen", str(args.seqlen), "--layers", str(args.layers)]
    base = dict(os.environ, OMP_NUM_THREADS=str(threads))
    envs = [base] if world == 1 else [
        dict(base, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for port in [_free_port()] for r in range(world)]
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, text=True) for e in envs]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a run failed: {outs}")
    return json.loads(outs[0].strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--layers", type=int, default=CONFIG.num_hidden_layers)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    params = sum(p.numel() for p in synthetic_llama(
        config=replace(CONFIG, num_hidden_layers=args.layers)).parameters())
    print(f"synthetic Llama {params / 1e6:.0f}M params ({args.layers} blocks, width "
          f"{CONFIG.hidden_size} / {CONFIG.intermediate_size}), GPTQ int4 g128, calibration "
          f"{args.samples} x {args.seqlen} tokens; {os.cpu_count()} CPUs; best of "
          f"{args.repeats}")
    print("| run | wall s | CPU s per rank | GPTQ CPU s per rank (own layers) | speed-up vs 1x1 "
          "| vs 1x2 |")
    print("|---|---|---|---|---|---|")
    base = {}
    for name, world, threads in RUNS:
        res = min((launch(args, world, threads) for _ in range(args.repeats)),
                  key=lambda r: r["wall"])
        base[(world, threads)] = res["wall"]
        s11 = base[(1, 1)] / res["wall"]
        s12 = base.get((1, 2), res["wall"]) / res["wall"]
        cpu = " / ".join(f"{x:.1f}" for x in res["cpu"])
        gptq = " / ".join(f"{x:.1f}" for x in res["gptq"])
        print(f"| {name} | {res['wall']:.1f} | {cpu} | {gptq} | {s11:.2f}x | {s12:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
