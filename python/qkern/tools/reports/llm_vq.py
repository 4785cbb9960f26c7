"""GPTVQ (``VQConfig``: learned, lattice and per-row LUT codebooks) against GPTQ and RTN on
models/wikitext-bytelm at matched bits per weight.

``python -m qkern.tools.reports.llm_vq [--configs NAME,...] [--gptq NAME,...] [--rtn NAME,...]``
prints a Markdown
table: bits per byte on WikiText-2 test (the first 48 windows of 256 bytes, as
:mod:`.llm`), calibration 64 x 256 bytes of WikiText-2 valid (the same data as the llm
report), and the total bits per weight over every quantized block linear:

- GPTQ and RTN wB gG (asymmetric, as the llm report runs them), counted as B-bit codes plus,
  per group,
  a float16 scale and a B-bit zero point (w2 g64: ``2 + 18 / 64`` on the 256-input layers;
  ``down_proj``'s 672 inputs take no group of 64 or 128, so one group per row there,
  ``2 + 18 / 672``);
- each VQ config of :data:`CONFIGS`: codes + float16 codebooks + float16 scales, counted
  exactly from the quantized layers (:func:`model_bits_per_weight`); the "ft" rows add the
  block-wise codebook fine-tuning (:mod:`qkern.quantization.algorithms.vq_finetune`); a lattice
  codebook (``codebook="d4"`` / ``"e8"``) is implicit and counts 0 bits, a LUT (``dim=1,
  group_rows=1``) counts its ``2^bits`` float16 levels per row.

Where a ``scale_group`` does not divide ``down_proj``'s 672 inputs, that layer gets one scale
per row (noted by the pipeline): ``s256`` is one scale per row on every layer.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from torch import nn

from ... import set_num_threads
from ...models import bits_per_byte, load_llama
from ...models.assets import shipped_path
from ...quantization import GPTQConfig, RTNConfig, VQConfig, text_calibration
from ...quantization.algorithms.vq import model_bits_per_weight
from .llm import quantize, wikitext_bytes

__all__ = ["CONFIGS", "GPTQ_SETTINGS", "RTN_SETTINGS", "gptq_bits", "main", "vq_table"]

#: label -> VQ config
CONFIGS: dict[str, VQConfig] = {
    "VQ d4 2b per-layer": VQConfig(bits=2, dim=4),
    "VQ d4 2b per-layer no-update": VQConfig(bits=2, dim=4, update_codebooks=False),
    "VQ d4 2b per-layer ft": VQConfig(bits=2, dim=4, finetune_steps=128, finetune_lr=3e-4),
    "VQ d2 2b rows16": VQConfig(bits=2, dim=2, group_rows=16),
    # the int8 fast mode (int8 codebooks and activations, qkern::gemm_vq8)
    "VQ d4 2b per-layer fast": VQConfig(bits=2, dim=4, mode="fast"),
    "VQ d2 3b per-layer fast": VQConfig(bits=3, dim=2, mode="fast"),
    "VQ d4 2b per-layer s256": VQConfig(bits=2, dim=4, scale_group=256),
    "VQ d2 2.5b per-layer": VQConfig(bits=2.5, dim=2),
    "VQ d2 2.5b rows32": VQConfig(bits=2.5, dim=2, group_rows=32),
    "VQ d2 3b per-layer": VQConfig(bits=3, dim=2),
    "VQ d2 3b rows64": VQConfig(bits=3, dim=2, group_rows=64),
    # fixed lattice codebooks (implicit: not counted) times per-row(-segment) scales
    "lattice D4 2b s256": VQConfig(bits=2, dim=4, codebook="d4", scale_group=256),
    "lattice E8 2b s256": VQConfig(bits=2, dim=8, codebook="e8", scale_group=256),
    "lattice E8 2b s32": VQConfig(bits=2, dim=8, codebook="e8", scale_group=32),
    "lattice D4 3b s256": VQConfig(bits=3, dim=4, codebook="d4", scale_group=256),
    # learned per-row non-uniform grid (SqueezeLLM-like LUT): 2^bits float16 levels per rows
    "LUT 2b rows1": VQConfig(bits=2, dim=1, group_rows=1),
    "LUT 3b rows1": VQConfig(bits=3, dim=1, group_rows=1),
    "LUT 3b rows4": VQConfig(bits=3, dim=1, group_rows=4),
}
#: GPTQ settings run beside them: label -> (bits, group)
GPTQ_SETTINGS = {"GPTQ w2 g64": (2, 64), "GPTQ w2 g32": (2, 32), "GPTQ w3 g64": (3, 64),
                 "GPTQ w3 g128": (3, 128)}
#: RTN settings (asymmetric, counted as GPTQ): label -> (bits, group)
RTN_SETTINGS = {"RTN w2 g64": (2, 64), "RTN w3 g64": (3, 64)}


def gptq_bits(model: nn.Module, bits: int, group: int) -> tuple[int, int]:
    """(total bits, weights) of asymmetric GPTQ ``w{bits} g{group}`` over the block linears:
    codes + per group a float16 scale and a ``bits``-bit zero point (one group per row where
    ``group`` does not divide the input size)."""
    tot = n = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in f".{name}":
            o, k = m.weight.shape
            g = group if k % group == 0 else k
            tot += o * k * bits + o * (k // g) * (16 + bits)
            n += o * k
    return tot, n


def vq_table(labels: list[str], gptq: list[str], n_cal: int = 64,
             rtn: tuple[str, ...] = ()) -> Iterator[str]:
    """The table's lines, one by one (each row as soon as it is measured)."""
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    valid, test = wikitext_bytes()
    cal = text_calibration(valid, "bytes", n_cal, 256)
    with torch.no_grad():
        fp = bits_per_byte(model, test)
    yield ("wikitext-bytelm: bits per byte on WikiText-2 test (48 x 256 bytes), calibration "
           f"{n_cal} x 256 bytes of WikiText-2 valid; bits per weight over the block linears")
    yield ""
    yield "| method | bits per byte | bits per weight (bits / weights) | seconds |"
    yield "|---|---|---|---|"
    yield f"| fp32 | {fp:.4f} | 32 | |"
    scalar = [(lab, GPTQConfig, GPTQ_SETTINGS[lab]) for lab in gptq]
    scalar += [(lab, RTNConfig, RTN_SETTINGS[lab]) for lab in rtn]
    for lab, cls, (bits, group) in scalar:
        q, secs = quantize(model, cls(bits=bits, group_size=group, sym=False), cal)
        b, n = gptq_bits(model, bits, group)
        with torch.no_grad():
            yield f"| {lab} | {bits_per_byte(q, test):.4f} | {b / n:.4f} ({b} / {n}) | {secs:.0f} |"
    for lab in labels:
        q, secs = quantize(model, CONFIGS[lab], cal)
        b, n = model_bits_per_weight(q)
        with torch.no_grad():
            yield f"| {lab} | {bits_per_byte(q, test):.4f} | {b / n:.4f} ({b} / {n}) | {secs:.0f} |"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qkern.tools.reports.llm_vq",
                                description="GPTVQ vs GPTQ on wikitext-bytelm")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--gptq", default="GPTQ w2 g64",
                   help=f"comma-separated GPTQ rows, from: {', '.join(GPTQ_SETTINGS)} ('' none)")
    p.add_argument("--rtn", default="",
                   help=f"comma-separated RTN rows, from: {', '.join(RTN_SETTINGS)} ('' none)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    a = p.parse_args(argv)
    labels = [c.strip() for c in a.configs.split(",") if c.strip()]
    gptq = [c.strip() for c in a.gptq.split(",") if c.strip()]
    rtn = [c.strip() for c in a.rtn.split(",") if c.strip()]
    for c in labels:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    for c in gptq:
        if c not in GPTQ_SETTINGS:
            p.error(f"unknown GPTQ setting {c!r}; choose from {', '.join(GPTQ_SETTINGS)}")
    for c in rtn:
        if c not in RTN_SETTINGS:
            p.error(f"unknown RTN setting {c!r}; choose from {', '.join(RTN_SETTINGS)}")
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    for line in vq_table(labels, gptq, rtn=tuple(rtn)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
