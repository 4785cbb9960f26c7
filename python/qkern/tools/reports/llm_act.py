"""Activation quantization on the shipped models: the README's W8A8 / W4A8 table.

``python -m qkern.tools.reports.llm`` prints it after the weight-only tables (``--quick``: a
smaller evaluation). Rows: round-to-nearest W8A8 without smoothing (the baseline), SmoothQuant
W8A8 at the paper's O1 (per-token dynamic activations) and O3 (per-tensor static), LLM.int8
(threshold 6), ZeroQuant W4A8 (int4 g128 weights, int8 per-token activations) and rotation
W4A8 (QuaRot-style Hadamard rotation, int4 g128 weights, int8 activations per block of 32
along K on the fast kernels; on MiniLM's LayerNorm blocks too). Footnotes say what
SmoothQuant smooths on MiniLM (post-LN BERT: one pair per block).
Columns:

- models/wikitext-bytelm: bits per byte on WikiText-2 test, the weight-only table's
  evaluation (calibration: WikiText-2 valid windows of 256 bytes);
- all-MiniLM-L6-v2: mean cosine of the sentence embeddings to the fp32 model's on WikiText-2
  test sentences (the MiniLM report's sentences), calibration on WikiText-2 valid sentences.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ...models import bits_per_byte, load_llama
from ...models.assets import shipped_path
from ...models.bert import embed, load_minilm
from ...quantization import BaseConfig, quantize_model, registered_configs, text_calibration
from .minilm import calibration as minilm_calibration
from .minilm import sentences

__all__ = ["ACT_METHODS", "NOT_ON_BERT", "act_table"]


def _cfg(name: str, **kw) -> BaseConfig | None:
    cls = registered_configs().get(name)
    return None if cls is None else cls(**kw)


#: row label -> config factory (None where the method is not registered)
ACT_METHODS: dict[str, Callable[[], BaseConfig | None]] = {
    "RTN W8A8 (no smoothing, act per token)":
        lambda: _cfg("SmoothQuantConfig", pairs="none", act="O1"),
    "SmoothQuant W8A8 O1 (alpha 0.5, act per token dynamic)":
        lambda: _cfg("SmoothQuantConfig", alpha=0.5, act="O1"),
    "SmoothQuant W8A8 O3 (alpha 0.5, act per tensor static)":
        lambda: _cfg("SmoothQuantConfig", alpha=0.5, act="O3"),
    "LLM.int8 (threshold 6)": lambda: _cfg("LLMInt8Config", threshold=6.0),
    "ZeroQuant W4A8 (int4 g128 sym, act per token)":
        lambda: _cfg("ZeroQuantConfig", bits=4, group_size=128),
    "rotation W4A8 (Hadamard, int4 g128, act int8 per 32 along K)":
        lambda: _cfg("RotationConfig", bits=4, group_size=128, act_bits=8),
}
#: rows that cannot run on BERT -> why (printed as a footnote); none since RotationConfig
#: rotates LayerNorm blocks too
NOT_ON_BERT: dict[str, str] = {}
#: SmoothQuant's warning for a linear it could not smooth
UNSMOOTHED = "no foldable predecessor"


def _quantize(model: nn.Module, cfg: BaseConfig, cal) -> tuple[nn.Module, float, list[str]]:
    """(quantized model, seconds, the warnings' messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        q = quantize_model(model, cfg, cal, progress=False)
        secs = time.perf_counter() - t
    return q, secs, [str(w.message) for w in caught]


def _smoothing_note(q: nn.Module, messages: list[str]) -> str | None:
    """How many of MiniLM's linears SmoothQuant smoothed, and why not the others (from its
    warning), or None when it smoothed all."""
    n = len(getattr(q, "qkern_report", ()))
    k = sum(line.count(UNSMOOTHED) for line in messages)
    if not k:
        return None
    return (f"SmoothQuant on MiniLM smooths {n - k} of its {n} linears: per block only "
            "value -> attention.output.dense (folded per channel into value's rows). BERT is "
            "post-LN: each LayerNorm also feeds the residual stream, so no scale can be folded "
            "into it (q/k/v and intermediate.dense), and GELU sits between intermediate.dense "
            f"and output.dense; those {k} run W8A8 unsmoothed (SmoothQuant's warning lists them)")


def _cos(e: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(e, ref, dim=-1).mean())


def act_table(methods: list[str] | None = None, n_cal: int = 64, n_windows: int = 48,
              n_sentences: int = 256, n_cal_sentences: int = 64,
              bytelm_path: str = "models/wikitext-bytelm") -> str:
    """The Markdown table (see the module docstring). ``methods``: labels of
    :data:`ACT_METHODS` (default all); the sizes: bytelm calibration windows / evaluation
    windows, MiniLM evaluation / calibration sentences."""
    methods = list(ACT_METHODS) if methods is None else methods
    for m in methods:
        if m not in ACT_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(ACT_METHODS)}")
    lm = load_llama(shipped_path(bytelm_path))
    valid = shipped_path("data/wikitext-2/wiki.valid.tokens").read_bytes()
    test = shipped_path("data/wikitext-2/wiki.test.tokens").read_bytes()
    cal = text_calibration(valid, "bytes", n_cal, 256)
    bert = load_minilm()
    sents = sentences(n_sentences, "test")
    bcal = minilm_calibration(n_cal_sentences)
    with torch.no_grad():
        fp = bits_per_byte(lm, test, n_windows=n_windows)
        ref = embed(bert, sents)
    lines = [f"Activation quantization: wikitext-bytelm bits per byte on WikiText-2 test "
             f"({n_windows} x 256 bytes; calibration {n_cal} x 256 bytes of valid) and "
             f"all-MiniLM-L6-v2 mean sentence-embedding cosine to fp32 ({n_sentences} "
             f"WikiText-2 test sentences; calibration {n_cal_sentences} valid sentences); "
             "seconds to quantize in brackets", "",
             "| method | bytelm bits/byte | MiniLM cosine |", "|---|---|---|",
             f"| fp32 | {fp:.4f} | 1.00000 |"]
    notes: list[str] = []

    def mark(note: str) -> str:
        if note not in notes:
            notes.append(note)
        return f" [{notes.index(note) + 1}]"

    for m in methods:
        cfg = ACT_METHODS[m]()
        if cfg is None:
            lines.append(f"| {m} | n/a | n/a |")
            continue
        q, secs, _ = _quantize(lm, cfg, cal)
        with torch.no_grad():
            cell_lm = f"{bits_per_byte(q, test, n_windows=n_windows):.4f} ({secs:.0f} s)"
        del q
        if m in NOT_ON_BERT:
            cell_b = "n/a" + mark(NOT_ON_BERT[m])
        else:
            qb, secs, msgs = _quantize(bert, ACT_METHODS[m](), bcal)
            with torch.no_grad():
                cell_b = f"{_cos(embed(qb, sents), ref):.5f} ({secs:.0f} s)"
            note = _smoothing_note(qb, msgs) if m.startswith("SmoothQuant") else None
            cell_b += mark(note) if note else ""
            del qb
        lines.append(f"| {m} | {cell_lm} | {cell_b} |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {n}." for i, n in enumerate(notes, 1)]
    return "\n".join(lines)
