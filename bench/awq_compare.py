"""AWQ: the scales and clip ranges qkern's AWQConfig chooses beside mit-han-lab/llm-awq's.

Same model, calibration and shims as bench/awq_reference.py (see its docstring). Per block and
scaling pair: the alpha each side chose (llm-awq's is read back from its scales: the grid
alpha whose ``s_x^alpha``, normalised, is nearest), the largest relative difference of the
scales, and qkern's loss at both alphas; per clipped layer: the share of (row, group) max
values that differ by more than 1e-4 relative, and the first one that does.

Run: PYTHONPATH=python OMP_NUM_THREADS=1 python bench/awq_compare.py [--bits 3] [--samples 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from awq_reference import VALID, hf_model, load_reference, shims

from qkern.models import load_llama
from qkern.models.assets import shipped_path
from qkern.quantization import AWQConfig, quantize_sequential, text_calibration
from qkern.quantization.algorithms.awq import AWQQuantizer, awq_scales
from qkern.quantization.calibration import call_model

MODEL = shipped_path("models/wikitext-bytelm")


def alpha_of(scales: torch.Tensor, x_mean: torch.Tensor, n_grid: int) -> tuple[float, float]:
    """The grid alpha whose normalised ``x_mean^alpha`` is nearest ``scales`` and the largest
    relative difference to it."""
    alphas = torch.arange(n_grid, dtype=torch.float64) / n_grid
    cand = awq_scales(x_mean, alphas)
    rel = ((cand - scales.double()).abs() / cand).amax(1)
    i = int(rel.argmin())
    return float(alphas[i]), float(rel[i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    cal = text_calibration(VALID, "bytes", args.samples, args.seqlen)
    x_means: dict[str, torch.Tensor] = {}

    class Recording(AWQQuantizer):
        def search_pair(self, ctx, prev, nexts):
            lin = ctx.block.get_submodule(nexts[0])
            acc = []
            h = lin.register_forward_pre_hook(
                lambda m, a: acc.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
            with torch.no_grad():
                for b in ctx.inputs:
                    call_model(ctx.block, b)
            h.remove()
            x_means[f"{ctx.name}.{prev}"] = torch.cat(acc).abs().mean(0)
            return super().search_pair(ctx, prev, nexts)

    q = Recording(AWQConfig(bits=args.bits, group_size=args.group))
    quantize_sequential(load_llama(MODEL), q, cal)
    with tempfile.TemporaryDirectory() as tmp:
        ref = load_reference(tmp)
        if isinstance(ref, str):
            sys.exit(f"awq_compare: {ref}")
        with shims(ref, cal):
            res = ref.pre_quant.run_awq(hf_model(), None, w_bit=args.bits,
                                        q_config={"zero_point": True,
                                                  "q_group_size": args.group},
                                        n_samples=args.samples, seqlen=args.seqlen)
    print(f"w{args.bits} g{args.group}, {args.samples} x {args.seqlen} calibration")
    print("| pair | alpha qkern | alpha llm-awq | max rel diff of scales | "
          "qkern loss at qkern's / llm-awq's alpha |\n|---|---|---|---|---|")
    for prev, _layers, s in res["scale"]:
        xm = x_means[prev]
        a_ref, fit = alpha_of(s, xm, q.config.n_grid)
        a_q = q.alphas[prev]
        rel = float(((q.scales[prev] - s.double()).abs() / s.double()).max())
        ls = q.losses[prev]
        i, j = round(a_q * q.config.n_grid), round(a_ref * q.config.n_grid)
        mark = "" if i == j else " **differs**"
        print(f"| {prev} | {a_q:.2f} | {a_ref:.2f} (fit {fit:.1e}) | {rel:.2e} | "
              f"{ls[i]:.6e} / {ls[j]:.6e}{mark} |")
    print("\n| layer | clip max values differing (>1e-4 rel) | first (row, group): qkern / "
          "llm-awq |\n|---|---|---|")
    for name, mx in res["clip"]:
        r = mx.reshape(mx.shape[0], -1).double()
        mine = q.clip_max[name].double()
        bad = (mine - r).abs() > 1e-4 * r.abs()
        first = ""
        if bad.any():
            i, g = (int(v) for v in bad.nonzero()[0])
            first = f"({i}, {g}): {float(mine[i, g]):.6f} / {float(r[i, g]):.6f}"
        print(f"| {name} | {int(bad.sum())} / {bad.numel()} | {first} |")


if __name__ == "__main__":
    main()
