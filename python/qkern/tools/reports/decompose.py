"""Decomposition + quantization: size against quality (docs/decompose.md).

``python -m qkern.tools.reports.decompose [--quick] [--no-llm] [--no-digits]`` prints two
Markdown tables:

- models/wikitext-bytelm: bits per byte on WikiText-2 test (the llm report's 48 windows of
  256 bytes) for RTN / GPTQ w3 g64 (asymmetric) alone, with LoRC at rank 4 / 8 / 16 (float
  factors), with int8 factors, with LQ-LoRA (LoRC + 2 alternating steps), and quantized SVD
  of every block linear at a few budgets; bits per weight over the block linears count the
  codes, a float16 scale and a zero point per group, and the low-rank factors (float factors
  at 16 bits per value). Each base runs once and its rows add the compensation after the
  fact (``compensate_model``; for RTN the same as the config), plus one row of
  ``LowRankCompensationConfig(base=GPTQConfig(...), rank=8)`` inside the pipeline.
  Calibration: 32 windows x 256 bytes of WikiText-2 valid (the llm report uses 64).
  ``--rows`` picks groups of rows: ``base`` (the above without SVD), ``lqlora`` (LQ-LoRA's
  alternating fit, 2 steps, rank 8 / 16, as ``LowRankCompensationConfig(base=GPTQ w3,
  iters=2)`` inside the pipeline), ``weighted`` (plain LoRC and the data-aware LoRC,
  ``weighted=True``, rank 8 / 16, in the pipeline), ``svd`` (quantized SVD); every row
  also gives the total bytes of the block linears (codes + scales + zero points +
  factors);
- the digits CNN (qkern.models.digits, trained with seed 0): held-out accuracy of the model
  with its second conv (16 -> 32, 3x3) replaced by a Tucker-2 (HOSVD + 2 HOOI sweeps) or CP
  (ALS) sequence, factors float32 / int8 / int4 (per output channel), without and with a
  3-epoch fine-tuning of the float decomposed network before quantizing the factors; size
  of that conv's weights in bits (float32 at 32 bits per weight).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

from ... import set_num_threads
from ...decompose import (
    compensate_model,
    decompose_convs,
    decompose_model,
    quantize_factors,
    storage_bits,
)
from ...models import bits_per_byte, load_llama
from ...models import digits as D
from ...models.assets import shipped_path
from ...nn import weight_bits
from ...quantization import (
    GPTQConfig,
    LowRankCompensationConfig,
    RTNConfig,
    replace_module,
    text_calibration,
    weight_module,
)
from .llm import quantize, wikitext_bytes

__all__ = ["ROW_GROUPS", "block_bits", "bytelm_rows", "digits_rows", "main"]

#: LLM rows: label -> config
BASES = {"RTN": RTNConfig(bits=3, group_size=64, sym=False),
         "GPTQ": GPTQConfig(bits=3, group_size=64, sym=False)}
RANKS = (4, 8, 16)
#: quantized SVD rows: (bits-per-weight budget, factor format, group)
SVD_BUDGETS = ((3.0, "int4", 32), (4.5, "int4", 32), (6.0, "int8", None))
#: groups of bytelm rows (``--rows``)
ROW_GROUPS = ("base", "lqlora", "weighted", "svd")


def block_bits(model: nn.Module) -> tuple[int, int]:
    """(bits, weights) over the layers inside the transformer blocks (``.layers.``): bits by
    :func:`qkern.nn.weight_bits` (float weights at 16 bits), weights those of the float
    linears they replace."""
    bits = n = 0
    for name, m in model.named_modules():
        if ".layers." in f".{name}" and hasattr(m, "out_features") and \
                name.rsplit(".", 1)[-1].endswith("proj"):
            bits += weight_bits(m)
            n += m.out_features * m.in_features
    return bits, n


def _row(lab: str, q: nn.Module, test: bytes, secs: float | None) -> str:
    b, n = block_bits(q)
    with torch.no_grad():
        bpb = bits_per_byte(q, test)
    t = "" if secs is None else f"{secs:.0f}"
    return f"| {lab} | {bpb:.4f} | {b / n:.3f} | {b // 8} | {t} |"


def bytelm_rows(quick: bool = False, n_cal: int = 32, rows: tuple = ("base", "svd")):
    """Yields the Markdown lines of the bytelm table. ``base``: each base runs once and its
    rows add the compensation after the fact (:func:`compensate_model`; seconds: the
    compensation's own), plus one row of ``LowRankCompensationConfig`` inside the GPTQ
    pipeline (not with ``quick``); ``lqlora`` / ``weighted``: GPTQ w3 alone, then
    ``LowRankCompensationConfig`` in the pipeline with ``iters=2`` / plain and
    ``weighted=True`` at rank 8 and 16 (rank 8 with ``quick``); ``svd``: quantized SVD
    (:data:`ROW_GROUPS`)."""
    bad = [r for r in rows if r not in ROW_GROUPS]
    if bad:
        raise ValueError(f"unknown row groups {bad}; choose from {ROW_GROUPS}")
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    valid, test = wikitext_bytes()
    cal = text_calibration(valid, "bytes", n_cal, 256)
    with torch.no_grad():
        fp = bits_per_byte(model, test)
    yield (f"wikitext-bytelm: bits per byte on WikiText-2 test (48 x 256 bytes; lower is "
           f"better), calibration {n_cal} x 256 bytes of WikiText-2 valid; bits per weight "
           "over the block linears (codes + float16 scales + zero points + low-rank factors, "
           "float factors at 16 bits); seconds to quantize (shared 2-core machine)")
    yield ""
    yield "| method | bits per byte | bits per weight | bytes (block linears) | seconds |"
    yield "|---|--:|--:|--:|--:|"
    yield f"| fp32 | {fp:.4f} | 32 | {4 * block_bits(model)[1]} | |"
    ranks = (8,) if quick else RANKS
    variants = [(f"LoRC r{r}", dict(rank=r)) for r in ranks]
    if not quick:
        variants.append(("LoRC r8 (int8 factors)", dict(rank=8, factor_fmt="int8")))
    variants.append(("LQ-LoRA r8 (2 steps)", dict(rank=8, iters=2)))
    for base_label, base in BASES.items() if "base" in rows else ():
        alone, secs = quantize(model, base, cal)
        yield _row(f"{base_label} w3 g64", alone, test, secs)
        for lab, kw in variants:
            t = time.perf_counter()
            q, _ = compensate_model(alone, model, **kw)
            yield _row(f"{base_label} w3 g64 + {lab}", q, test, time.perf_counter() - t)
    if not quick and "base" in rows:
        q, secs = quantize(model, LowRankCompensationConfig(base=BASES["GPTQ"], rank=8), cal)
        yield _row("GPTQ w3 g64 + LoRC r8 (config, in the pipeline)", q, test, secs)
    in_pipe = [(f"LQ-LoRA r{r} (2 steps)", dict(rank=r, iters=2)) for r in (8, 16)
               if "lqlora" in rows] + \
        [(f"{w}LoRC r{r}{x}", dict(rank=r, weighted=bool(w))) for r in (8, 16)
         for w, x in (("", ""), ("weighted ", " (fit to the inputs)")) if "weighted" in rows]
    in_pipe.sort(key=lambda v: v[1]["rank"])  # rank 8 first: the rows that matter most
    if quick:
        in_pipe = [v for v in in_pipe if v[1]["rank"] == 8]
    svd = SVD_BUDGETS[:1] if quick else SVD_BUDGETS
    yield from _svd_rows(model, test, svd if "svd" in rows else ())  # cheap: first
    for i, (lab, kw) in enumerate(in_pipe):
        if i == min(1, len(in_pipe) - 1) and "base" not in rows:  # GPTQ alone (base has it)
            alone, secs = quantize(model, BASES["GPTQ"], cal)
            yield _row("GPTQ w3 g64", alone, test, secs)
        q, secs = quantize(model, LowRankCompensationConfig(base=BASES["GPTQ"], **kw), cal)
        yield _row(f"GPTQ w3 g64 + {lab} (config, in the pipeline)", q, test, secs)


def _svd_rows(model, test, budgets):
    for budget, fmt, g in budgets:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = decompose_model(model, budget_bits=budget, fmt=fmt, group_size=g,
                                include=["*.layers.*"])
        gl = "per channel" if g is None else f"g{g}"
        yield _row(f"quantized SVD, {fmt} {gl} factors, budget {budget}", q, test,
                   time.perf_counter() - t)


#: digits rows: (method, rank)
DIGIT_RANKS = (("tucker", (8, 4)), ("tucker", (16, 8)), ("tucker", (24, 12)), ("cp", 4),
               ("cp", 8), ("cp", 16))

#: decompositions fine-tuned (the whole float network, 3 epochs of SGD) before quantizing
FINETUNED = (("tucker", (8, 4)), ("cp", 4), ("cp", 8))


def digits_rows(quick: bool = False):
    data = D.load_data()
    model = D.train("cnn", data)
    conv = "2"
    n_w = model.get_submodule(conv).weight.numel()
    fp = D.accuracy(model, data.x_test, data.y_test)
    yield (f"digits CNN ({len(data.y_test)} held-out images): conv {conv} (16 -> 32, 3x3, "
           f"{n_w} weights) decomposed, the rest float")
    yield ""
    yield "| conv 2 as | factors | accuracy | conv 2 bits | vs float32 |"
    yield "|---|---|--:|--:|--:|"
    yield f"| original | float32 | {100 * fp:.2f} % | {32 * n_w} | 1.00x |"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in ("int8", "int4"):
            q = weight_module(model.get_submodule(conv), fmt, None, {}, conv)
            m = _with(model, conv, q)
            b = storage_bits(q)
            acc = D.accuracy(m, data.x_test, data.y_test)
            yield f"| original | {fmt} | {100 * acc:.2f} % | {b} | {32 * n_w / b:.2f}x |"
        ranks = DIGIT_RANKS[1::3] if quick else DIGIT_RANKS
        for method, rank in ranks:
            for fmt in (None, "int8", "int4"):
                m = decompose_convs(model, method, rank, fmt=fmt, layers=[conv],
                                    als_iters=2 if method == "tucker" else 100)
                b = storage_bits(m.get_submodule(conv))
                acc = D.accuracy(m, data.x_test, data.y_test)
                r = f"Tucker-2 {rank}" if method == "tucker" else f"CP rank {rank}"
                yield (f"| {r} | {fmt or 'float32'} | {100 * acc:.2f} % | {b} | "
                       f"{32 * n_w / b:.2f}x |")
        for method, rank in () if quick else FINETUNED:
            m = decompose_convs(model, method, rank, layers=[conv],
                                als_iters=2 if method == "tucker" else 100)
            D.finetune(m, data, epochs=3)
            for fmt in (None, "int8", "int4"):
                seq = m.get_submodule(conv)
                mq = m if fmt is None else _with(m, conv, quantize_factors(seq, fmt))
                b = storage_bits(mq.get_submodule(conv))
                acc = D.accuracy(mq, data.x_test, data.y_test)
                r = f"Tucker-2 {rank}" if method == "tucker" else f"CP rank {rank}"
                yield (f"| {r} + fine-tune 3 epochs | {fmt or 'float32'} | {100 * acc:.2f} % "
                       f"| {b} | {32 * n_w / b:.2f}x |")


def _with(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    replace_module(out, name, new)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qkern.tools.reports.decompose",
                                description="decomposition + quantization: size vs quality")
    p.add_argument("--quick", action="store_true", help="fewer rows (GPTQ only, rank 8)")
    p.add_argument("--no-llm", action="store_true", help="skip the bytelm table")
    p.add_argument("--no-digits", action="store_true", help="skip the digits CNN table")
    p.add_argument("--rows", default="base,svd",
                   help=f"bytelm row groups, from {', '.join(ROW_GROUPS)} (default base,svd)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    a = p.parse_args(argv)
    rows = tuple(r.strip() for r in a.rows.split(",") if r.strip())
    bad = [r for r in rows if r not in ROW_GROUPS]
    if bad or not rows:
        p.error(f"bad --rows {a.rows!r}: choose from {', '.join(ROW_GROUPS)}")
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    if not a.no_digits:
        for line in digits_rows(a.quick):
            print(line, flush=True)
        print()
    if not a.no_llm:
        for line in bytelm_rows(a.quick, rows=rows):
            print(line, flush=True)


if __name__ == "__main__":
    main()
