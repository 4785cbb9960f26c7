"""Integer attention and model-wide mixed 8/16-bit activations: docs/attention.md.

``python -m qkern.tools.reports.attention [--windows 48] [--sentences 128] [--threads 2]``
prints three Markdown tables:

1. int8 attention (``QuantizedAttentionConfig``: Q K^T and P V on int8 / uint8 operands, int32
   accumulation) on models/wikitext-bytelm (qkern's Llama, bits per byte on the first
   ``--windows`` windows of 256 bytes of WikiText-2 *test*, scales calibrated on 16 windows of
   *valid*) and on all-MiniLM-L6-v2 (sentence-embedding cosine vs fp32 on ``--sentences``
   WikiText-2 *test* sentences, scales from 64 *valid* sentences), each beside float attention;
2. LLM.int8 on every Linear (``LLMInt8Config``, lm_head float) vs the outlier threshold: how
   many input channels crossed it on the evaluation text (``outlier_report``: summed over the
   layers, and the mean per call) and the bits per byte;
3. the per-layer outlier counts at threshold 6 (the paper's alpha).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

from ... import quantize_model, set_num_threads
from ...models import bits_per_byte, load_llama
from ...models.assets import shipped_path
from ...models.bert import embed, load_minilm
from ...quantization import LLMInt8Config, QuantizedAttentionConfig, outlier_report
from .llm import wikitext_bytes
from .minilm import calibration, sentences

__all__ = ["ATTENTION", "THRESHOLDS", "attention_rows", "main", "outlier_rows"]

#: (row label, config; None = float attention)
ATTENTION: list[tuple[str, QuantizedAttentionConfig | None]] = [
    ("float attention", None),
    ("int8 Q/K/V per head, P uint8", QuantizedAttentionConfig()),
    ("int8 Q/V per head, K per channel, P uint8", QuantizedAttentionConfig(k_per_channel=True)),
    ("int8 Q/K/V per head, P fp8 e4m3", QuantizedAttentionConfig(p_fmt="fp8_e4m3")),
]
THRESHOLDS = (math.inf, 8.0, 6.0, 4.0, 2.0)
WINDOW = 256


def _windows(data: bytes, n: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(data[:n * WINDOW]), dtype=torch.uint8).long().view(n, WINDOW)


def _quiet(model, cfg, cal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(model, cfg, cal)


def attention_rows(n_windows: int, n_sentences: int) -> list[tuple[str, float, float, float]]:
    """(label, bytelm bits per byte, MiniLM mean cosine, MiniLM worst cosine)."""
    valid, test = wikitext_bytes()
    llm = load_llama(shipped_path("models/wikitext-bytelm"))
    cal = list(_windows(valid, 16).split(8))
    bert = load_minilm()
    sents, bcal = sentences(n_sentences), calibration(64)
    ref = embed(bert, sents)
    rows = []
    for label, cfg in ATTENTION:
        ql = llm if cfg is None else _quiet(llm, cfg, cal)
        qb = bert if cfg is None else _quiet(bert, cfg, bcal)
        cos = (embed(qb, sents) * ref).sum(-1)
        rows.append((label, bits_per_byte(ql, test, WINDOW, n_windows), float(cos.mean()),
                     float(cos.min())))
    return rows


def outlier_rows(n_windows: int) -> tuple[list[tuple[float, int, int, float, float]], str]:
    """Per threshold: (threshold, outlier channels summed over layers, input channels, mean
    per call summed over layers, bits per byte of LLM.int8 at that threshold); and the
    per-layer table at 6.0."""
    valid, test = wikitext_bytes()
    llm = load_llama(shipped_path("models/wikitext-bytelm"))
    data = list(_windows(test, n_windows).split(16))
    rows, detail = [], ""
    for t in THRESHOLDS:
        r = outlier_report(llm, data, t)
        q = _quiet(llm, LLMInt8Config(threshold=t), None)
        rows.append((t, r.channels, r.in_features, sum(x.per_call for x in r.rows),
                     bits_per_byte(q, test, WINDOW, n_windows)))
        if t == 6.0:
            detail = r.markdown()
    return rows, detail


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    print(f"### int8 attention (wikitext-bytelm: {a.windows} x {WINDOW} bytes of test; "
          f"all-MiniLM-L6-v2: {a.sentences} test sentences)\n")
    print("| attention | bytelm bits/byte | MiniLM cos mean | MiniLM cos worst |")
    print("|---|---:|---:|---:|")
    for label, bpb, cm, cw in attention_rows(a.windows, a.sentences):
        print(f"| {label} | {bpb:.4f} | {cm:.5f} | {cw:.5f} |")
    rows, detail = outlier_rows(a.windows)
    print("\n### LLM.int8 on every Linear (lm_head float) vs threshold, wikitext-bytelm\n")
    print("| threshold | outlier channels (sum over layers) | % of input channels "
          "| mean per call | bits/byte |")
    print("|---:|---:|---:|---:|---:|")
    for t, ch, tot, per_call, bpb in rows:
        print(f"| {t:g} | {ch} / {tot} | {100 * ch / tot:.2f} | {per_call:.1f} | {bpb:.4f} |")
    print("\n### outlier channels per layer at threshold 6\n")
    print(detail)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
