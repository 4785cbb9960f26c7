"""Hadamard rotation on the wikitext-bytelm: bits per byte on WikiText-2 test (48 windows of
256 bytes) for round to nearest with and without the rotation (qkern.RotationConfig), at
w4 g128, w3 g128, w4 per channel, w2 g64, and W4A8 (int8 activations: qkern's fast int4
kernel, int8 per 32-block), plus the float model and the rotated float model (equal up to
rounding).

    PYTHONPATH=python python bench/rotation.py [--seeds 0 1 2]

--gptq adds GPTQ, RotationConfig(then=GPTQConfig) (random and plain signs) and rotate_model +
GPTQ (calibration: 64 x 256 bytes of WikiText-2 valid).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import qkern
from qkern.models import assets
from qkern.models.llama import bits_per_byte, load_llama
from qkern.nn import QuantLinear
from qkern.quantization import find_blocks, rotate_block, text_calibration
from qkern.quantization.algorithms.rotation import a8_linear, rotate_model

SETTINGS = [("w4 g128", 4, 128), ("w3 g128", 3, 128), ("w4 per-channel", 4, None),
            ("w2 g64", 2, 64)]


def _a8(model: torch.nn.Module) -> torch.nn.Module:
    """Every QuantLinear with int8 activations (a8_linear: the W4A8 baseline)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, a8_linear(mod))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--gptq", action="store_true")
    ap.add_argument("--windows", type=int, default=48)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_llama(assets.shipped_path(assets.WIKITEXT_BYTELM))
    data = open(assets.shipped_path(assets.WIKITEXT_TEXT.format(split="test")), "rb").read()
    bpb = lambda m: bits_per_byte(m, data, n_windows=args.windows)  # noqa: E731
    fp = bpb(model)
    rot = copy.deepcopy(model)
    for i, b in enumerate(find_blocks(rot)[1]):
        rotate_block(b, 0, i)
    print(f"wikitext-bytelm, WikiText-2 test, {args.windows} windows x 256 bytes; bits per byte")
    print(f"fp32 {fp:.4f}   rotated fp32 {bpb(rot):.4f}\n")
    cal = None
    if args.gptq:
        valid = assets.shipped_path(assets.WIKITEXT_TEXT.format(split="valid"))
        cal = text_calibration(valid, "bytes", n_samples=64, seqlen=256)
    quarot = rotate_model(copy.deepcopy(model), 0)
    cols = ["RTN", "rot+RTN", "H+RTN", "QuaRot+RTN"]
    if args.gptq:
        cols += ["GPTQ", "rot+GPTQ", "H+GPTQ", "QuaRot+GPTQ"]
    print(f"{'setting':<16}" + "".join(f"{c:>12}" for c in cols) + f"{'seconds':>9}")
    rows = [(n, b, g, False) for n, b, g in SETTINGS] + [("W4A8 g128", 4, 128, True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, bits, g, a8 in rows:
            t0 = time.perf_counter()
            base = qkern.quantize_model(model, qkern.RTNConfig(bits=bits, group_size=g))
            vals = [bpb(_a8(base) if a8 else base)]
            r = []
            for s in args.seeds:
                cfg = qkern.RotationConfig(bits=bits, group_size=g, seed=s,
                                           act_bits=8 if a8 else None)
                r.append(bpb(qkern.quantize_model(model, cfg)))
            vals.append(sum(r) / len(r))
            cfg = qkern.RotationConfig(bits=bits, group_size=g, random_signs=False,
                                       act_bits=8 if a8 else None)
            vals.append(bpb(qkern.quantize_model(model, cfg)))
            q = qkern.quantize_model(quarot, qkern.RTNConfig(bits=bits, group_size=g))
            vals.append(bpb(_a8(q) if a8 else q))
            if args.gptq:
                G = qkern.GPTQConfig
                q = qkern.quantize_model(model, G(bits=bits, group_size=g), cal)
                vals.append(bpb(_a8(q) if a8 else q))
                for signs in (True, False):
                    cfg = qkern.RotationConfig(bits=bits, group_size=g, random_signs=signs,
                                               act_bits=8 if a8 else None,
                                               then=G(bits=bits, group_size=g))
                    vals.append(bpb(qkern.quantize_model(model, cfg, cal)))
                q = qkern.quantize_model(quarot, G(bits=bits, group_size=g), cal)
                vals.append(bpb(_a8(q) if a8 else q))
            print(f"{name:<16}" + "".join(f"{v:12.4f}" for v in vals) +
                  f"{time.perf_counter() - t0:9.1f}")
    print(f"\nrot: RotationConfig, random signs (mean over seeds {args.seeds}); H: the plain "
          "Hadamard (random_signs=False); QuaRot: rotate_model (the residual stream rotated, "
          "seed 0), then RTNConfig")


if __name__ == "__main__":
    main()
