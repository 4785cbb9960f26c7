"""Fused LSQ fake quantization, forward + backward: qkern::lsq_fake_quantize (one pass each way,
csrc/cpu/fakequant) beside torch's own fused learnable fake quantization
(torch._fake_quantize_learnable_per_{tensor,channel}_affine) and the autograd formula of
qkern.observers.lsq (lsq_fake_quantize(kernel=False)), all float32, in the same run. Each call
computes y, then grad_x and grad_scale from a fixed grad_y (torch.autograd.grad).

cold: the caches flushed before every call (qkern.tools.bench.timing.Flusher); warm: not.
GB/s: the bytes the fused op must move (forward reads x, writes y; backward reads x and
grad_y, writes grad_x: 20 bytes per element) / time, beside the read-bandwidth probe (a
torch sum over 256 MiB, sampled between the calls).

    PYTHONPATH=python python bench/fake_quant.py --threads 1
"""

from __future__ import annotations

import argparse
import math

import torch

import qkern
from qkern.observers.lsq import lsq_fake_quantize
from qkern.tools.bench.timing import Flusher, Probe, machine_line, time_alternating

Q_N, Q_P = 8, 7  # int4
# (label, shape, axis): a weight per output channel, activations per tensor / per feature
SHAPES = [("weight 4096x4096, per-channel (axis 0)", (4096, 4096), 0),
          ("activation 512x4096, per-tensor", (512, 4096), None),
          ("activation 512x4096, per-channel (last axis)", (512, 4096), 1)]


def _impls(x: torch.Tensor, s: torch.Tensor, axis: int | None) -> dict:
    n_per = x.numel() // s.numel()
    g = 1.0 / math.sqrt(n_per * Q_P)
    gy = torch.randn_like(x)
    xs, ss = x.requires_grad_(), s.requires_grad_()
    zp = torch.zeros(s.numel(), requires_grad=True)
    s1 = s.detach().reshape(-1).clone().requires_grad_()

    def qkern_op():
        y = torch.ops.qkern.lsq_fake_quantize(xs, ss, None, axis, Q_N, Q_P, g)
        return torch.autograd.grad(y, (xs, ss), gy)

    def torch_op():
        if axis is None:
            y = torch._fake_quantize_learnable_per_tensor_affine(xs, s1, zp, -Q_N, Q_P, g)
        else:
            y = torch._fake_quantize_learnable_per_channel_affine(xs, s1, zp, axis, -Q_N, Q_P,
                                                                   g)
        return torch.autograd.grad(y, (xs, s1), gy)

    def formula():
        y = lsq_fake_quantize(xs, ss, Q_N, Q_P, axis=axis, kernel=False)
        return torch.autograd.grad(y, (xs, ss), gy)

    return {"qkern": qkern_op, "torch": torch_op, "formula": formula}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qkern.set_num_threads(args.threads)
    print(machine_line(args.threads))
    probe = Probe.make(256 << 20)
    flush = Flusher()
    rows = []
    for label, shape, axis in SHAPES:
        x = torch.randn(shape)
        c = 1 if axis is None else shape[axis]
        s = torch.full((c,) if axis is not None else (), 2 * x.abs().mean().item() / Q_P ** 0.5)
        impls = _impls(x, s, axis)
        for mode in ("cold", "warm"):
            t, _ = time_alternating(impls, args.repeats, warmup=1, probe=probe,
                                    flush=flush if mode == "cold" else None, budget_s=20.0)
            rows.append((label, mode, x.numel(), t))
    read = probe.read_gbs()
    print(f"read bandwidth probe: {read:.1f} GB/s; ms per forward + backward; "
          "x = time / qkern's; GB/s = 20 bytes per element / qkern's time\n")
    head = (f"{'shape':<46} {'':>4} | {'qkern':>7} | {'torch fused':>11} {'x':>5} | "
            f"{'autograd':>8} {'x':>5} | {'GB/s':>5} {'% read':>6}")
    print(head)
    print("-" * len(head))
    for label, mode, n, t in rows:
        ms = {k: v * 1e3 for k, v in t.items()}
        gbs = 20 * n / t["qkern"] / 1e9
        print(f"{label:<46} {mode:>4} | {ms['qkern']:7.2f} | {ms['torch']:11.2f} "
              f"{ms['torch'] / ms['qkern']:5.1f} | {ms['formula']:8.2f} "
              f"{ms['formula'] / ms['qkern']:5.1f} | {gbs:5.1f} {100 * gbs / read:5.0f}%")


if __name__ == "__main__":
    main()
