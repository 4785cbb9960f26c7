"""ZeroQuant and LLM.int8 on the shipped wikitext-bytelm: bits per byte on WikiText-2 test (48
windows of 256 bytes; calibration 64 x 256 bytes of WikiText-2 valid, used by ZeroQuant's LKD)
beside fp32, RTN weight-only and plain per-token W8A8 (DynamicConfig on the block linears).

    PYTHONPATH=python python bench/zeroquant.py [--threads 2] [--lkd-steps 50]

Also prints how many input columns LLM.int8 computes in float (the outlier feature dimensions,
|x| >= 6) per call, on average over the layers.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import qkern
from qkern.models import bits_per_byte, load_llama
from qkern.nn import QuantLinear
from qkern.ops.w8mixed import outlier_columns
from qkern.quantization import text_calibration

BLOCKS = ["model.layers.*"]


def outlier_share(model, text: bytes) -> str:
    """Mean share of input columns in float per LLM.int8 call (and the largest)."""
    seen: list[float] = []

    def hook(mod, args):
        x = args[0].detach().reshape(-1, mod.in_features).float()
        seen.append(len(outlier_columns(x, float(mod.outlier_threshold))) / mod.in_features)

    hs = [m.register_forward_pre_hook(hook) for m in model.modules()
          if isinstance(m, QuantLinear) and m.act == "int8_mixed"]
    bits_per_byte(model, text, n_windows=8)
    for h in hs:
        h.remove()
    return f"{100 * sum(seen) / max(1, len(seen)):.2f} % (max {100 * max(seen, default=0):.2f} %)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/wikitext-bytelm")
    ap.add_argument("--data", default="data/wikitext-2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lkd-steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qkern.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = load_llama(args.model)
    test = open(f"{args.data}/wiki.test.tokens", "rb").read()
    cal = text_calibration(f"{args.data}/wiki.valid.tokens", "bytes", n_samples=64, seqlen=256)
    runs = {
        "fp32": None,
        "RTN w8 per-channel (weight-only)": qkern.RTNConfig(bits=8, group_size=None),
        "W8A8 per-token (DynamicConfig)": qkern.DynamicConfig(include=BLOCKS),
        "LLM.int8 threshold 6": qkern.LLMInt8Config(include=BLOCKS),
        "ZeroQuant W8A8 per-channel": qkern.ZeroQuantConfig(bits=8),
        "ZeroQuant W8A8 per-channel + LKD": qkern.ZeroQuantConfig(
            bits=8, lkd=True, lkd_steps=args.lkd_steps),
        "RTN w4 g128 (weight-only)": qkern.RTNConfig(bits=4, group_size=128),
        "ZeroQuant W4A8 g128": qkern.ZeroQuantConfig(bits=4, group_size=128),
        "ZeroQuant W4A8 g128 + LKD": qkern.ZeroQuantConfig(
            bits=4, group_size=128, lkd=True, lkd_steps=args.lkd_steps),
    }
    print(f"wikitext-bytelm, WikiText-2 test 48 x 256 bytes, {args.threads} threads")
    print(f"{'method':<36}{'bits/byte':>10}{'quantize s':>12}")
    for name, cfg in runs.items():
        t0 = time.perf_counter()
        q = model if cfg is None else qkern.quantize_model(model, cfg, cal, progress=False)
        dt = time.perf_counter() - t0
        print(f"{name:<36}{bits_per_byte(q, test):>10.4f}{dt:>12.1f}", flush=True)
        if isinstance(cfg, qkern.LLMInt8Config):
            print(f"{'':<4}input columns in float per call: {outlier_share(q, test)}")


if __name__ == "__main__":
    main()
