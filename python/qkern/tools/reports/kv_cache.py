"""Quantized KV cache (``qkern.kv.QuantizedKVCache``) on models/wikitext-bytelm: docs/kv_cache.md.

``python -m qkern.tools.reports.kv_cache [--windows 48] [--prefill 16] [--chunk 16]``

Bits per byte on WikiText-2 *test* (the first ``--windows`` windows of 256 bytes, as the llm
report's fp32 figure) where the model reads its past through the cache: each window is a
prefill of ``--prefill`` bytes, then the rest fed ``--chunk`` bytes at a time through
``past_key_values``, so attention sees the quantized keys / values of every earlier chunk that
the cache has flushed. The fp32 row runs transformers' DynamicCache through the same chunked
path; the plain (one forward per window) figure is printed above the table as the check.
"Cache bytes / token" is ``cache.bytes_per_token()`` at the end of a window (256 tokens: codes
+ scales + zero points + the float window, all 4 layers, keys and values; fp32 is 8 KiB).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ...kv import QuantizedKVCache
from ...models import load_pretrained
from ...models.assets import shipped_path
from .llm import wikitext_bytes

WINDOW = 256

#: label -> QuantizedKVCache arguments (None: the fp32 DynamicCache)
ROWS: dict[str, dict | None] = {"fp32 (DynamicCache)": None}
for _b, _f in ((8, "int"), (8, "fp8")):
    ROWS[f"{'int8' if _f == 'int' else 'fp8 e4m3'} g32 r0"] = {
        "bits": _b, "fmt": _f, "group_size": 32, "residual": 0}
for _g in (32, 64, 128):
    for _r in (0, 32, 128):
        ROWS[f"int4 g{_g} r{_r}"] = {"bits": 4, "group_size": _g, "residual": _r}
ROWS["int4 g32 r0 symmetric"] = {"bits": 4, "group_size": 32, "residual": 0, "symmetric": True}


def windows(data: bytes, n: int) -> torch.Tensor:
    n = min(n, len(data) // WINDOW)
    return torch.frombuffer(bytearray(data[:n * WINDOW]), dtype=torch.uint8).long().view(n, WINDOW)


def nll_bits(logits: torch.Tensor, x: torch.Tensor) -> tuple[float, int]:
    """Summed next-byte cross-entropy (nats) of bytes 1.. and their count."""
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                          x[:, 1:].reshape(-1), reduction="sum")
    return float(nll), x[:, 1:].numel()


def chunked_logits(model, x: torch.Tensor, cache, prefill: int, chunk: int) -> torch.Tensor:
    """Logits of ``x`` computed by a prefill then chunks, the past read through ``cache``."""
    out, start = [], 0
    for stop in [prefill, *range(prefill + chunk, x.shape[1] + chunk, chunk)]:
        stop = min(stop, x.shape[1])
        out.append(model(x[:, start:stop], past_key_values=cache, use_cache=True).logits)
        start = stop
    return torch.cat(out, dim=1)


def evaluate(model, ids: torch.Tensor, args: dict | None, prefill: int, chunk: int,
             batch: int = 16) -> tuple[float, float]:
    """(bits per byte, cache bytes per token at the end of a window) through the cache."""
    total, count, per_token = 0.0, 0, 0.0
    for i in range(0, ids.shape[0], batch):
        x = ids[i:i + batch]
        cache = DynamicCache() if args is None else QuantizedKVCache(**args)
        nll, n = nll_bits(chunked_logits(model, x, cache, prefill, chunk), x)
        total, count = total + nll, count + n
        if args is None:
            held = sum(t.numel() * t.element_size() for lay in cache.layers
                       for t in (lay.keys, lay.values))
            per_token = held / (x.shape[0] * x.shape[1])
        else:
            per_token = cache.bytes_per_token()
    return total / count / math.log(2), per_token


def plain_bpb(model, ids: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i:i + batch]
        nll, n = nll_bits(model(x, use_cache=False).logits, x)
        total, count = total + nll, count + n
    return total / count / math.log(2)


def table(n_windows: int = 48, prefill: int = 16, chunk: int = 16, rows=None) -> str:
    model = load_pretrained(shipped_path("models/wikitext-bytelm")).eval()
    ids = windows(wikitext_bytes()[1], n_windows)
    rows = ROWS if rows is None else {k: ROWS[k] for k in rows}
    with torch.no_grad():
        plain = plain_bpb(model, ids)
        results = {}
        for label, args in rows.items():
            t = time.perf_counter()
            results[label] = (*evaluate(model, ids, args, prefill, chunk),
                              time.perf_counter() - t)
    base = results.get("fp32 (DynamicCache)", (None,))[0]
    check = "" if base is None else f" (chunked fp32 - plain: {base - plain:+.1e})"
    lines = [f"wikitext-bytelm, WikiText-2 test, {ids.shape[0]} windows x {WINDOW} bytes; "
             f"prefill {prefill} bytes, then chunks of {chunk} through the cache. Plain "
             f"forward (no cache): {plain:.6f} bits per byte{check}.", "",
             "| cache | bits per byte | vs fp32 | cache bytes / token | seconds |",
             "|---|---|---|---|---|"]
    for label, (bpb, bpt, sec) in results.items():
        rel = "" if base is None else f"{100 * (bpb / base - 1):+.2f} %"
        lines.append(f"| {label} | {bpb:.4f} | {rel} | {bpt:.0f} | {sec:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m qkern.tools.reports.kv_cache",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--prefill", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--rows", default=None, help="comma-separated row labels (default: all)")
    a = p.parse_args(argv)
    rows = None if a.rows is None else [r.strip() for r in a.rows.split(",")]
    print(table(a.windows, a.prefill, a.chunk, rows))


if __name__ == "__main__":
    main()
