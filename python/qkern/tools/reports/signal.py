"""Predictive / differential coding of tensor streams (``qkern.signal``): docs/signal.md.

``python -m qkern.tools.reports.signal [--windows 8] [--bits 2,3,4]``

SQNR (dB, ``qkern.signal.sqnr``) and bits per value (codes + float32 side information) of
delta coding, closed-loop DPCM (least-squares predictor of order 1, 2, 4), IMA-ADPCM (4 bits)
and delta modulation (1 bit) against plain uniform quantization at the same code width
(``uint{bits}``, one min-max scale and zero point per stream: ``qkern.quantize``), on:

- the KV cache of models/wikitext-bytelm along time: ``--windows`` windows of 256 WikiText-2
  test bytes run with ``use_cache=True``; keys and values of all 4 layers
  (windows x 8 heads x 32 dims x 4 layers streams of 256 steps);
- a smooth signal: a mix of three sines with a little noise (48000 samples);
- the WikiText-2 test bytes as a signal (byte - 128, the first 200000 bytes).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ...models import load_pretrained
from ...models.assets import shipped_path
from ...signal import compress_stream, sqnr, uniform_baseline
from .llm import wikitext_bytes

WINDOW = 256


def kv_cache(windows: int) -> dict[str, np.ndarray]:
    """Keys and values of the byte LM's cache, each (T = 256, streams) float32."""
    model = load_pretrained(shipped_path("models/wikitext-bytelm"))
    _, test = wikitext_bytes()
    n = min(windows, len(test) // WINDOW)
    x = torch.frombuffer(bytearray(test[:n * WINDOW]), dtype=torch.uint8).long().view(n, WINDOW)
    with torch.no_grad():
        cache = model(x, use_cache=True).past_key_values
    out = {}
    for kind in ("keys", "values"):
        # per layer (windows, heads, T, head_dim) -> (T, layers x windows x heads x head_dim)
        t = torch.stack([getattr(layer, kind) for layer in cache.layers])
        out[f"KV cache {kind}"] = t.permute(3, 0, 1, 2, 4).reshape(WINDOW, -1).numpy().copy()
    return out


def smooth_signal(n: int = 48000) -> np.ndarray:
    t = np.arange(n)
    rng = np.random.default_rng(0)
    x = (0.6 * np.sin(2 * np.pi * 220 * t / 16000) + 0.3 * np.sin(2 * np.pi * 347 * t / 16000 + 1)
         + 0.1 * np.sin(2 * np.pi * 1210 * t / 16000) + 0.003 * rng.standard_normal(n))
    return x.astype(np.float32)[:, None]


def bytes_signal(n: int = 200_000) -> np.ndarray:
    _, test = wikitext_bytes()
    return (np.frombuffer(test[:n], np.uint8).astype(np.float32) - 128)[:, None]


def rows(x: np.ndarray, bits: list[int]) -> list[tuple[str, float, float]]:
    """(method, bits / value, SQNR dB) of every method on x (T, streams)."""
    out = []
    for b in bits:
        xu, bpv = uniform_baseline(x, axis=0, bits=b)
        out.append((f"uniform {b}-bit", bpv, sqnr(x, xu)))
        for label, kw in ((f"delta {b}-bit", {"method": "delta"}),
                          *((f"DPCM order {p} {b}-bit", {"method": "dpcm", "order": p})
                            for p in (1, 2, 4))):
            c = compress_stream(x, axis=0, bits=b, **kw)
            out.append((label, c.bits_per_value, sqnr(x, c.decompress())))
        if b == 4:
            c = compress_stream(x, axis=0, method="adpcm", bits=4)
            out.append(("IMA-ADPCM 4-bit", c.bits_per_value, sqnr(x, c.decompress())))
    xu, bpv = uniform_baseline(x, axis=0, bits=1)
    out.append(("uniform 1-bit", bpv, sqnr(x, xu)))
    c = compress_stream(x, axis=0, method="delta", bits=1)
    out.append(("delta modulation 1-bit", c.bits_per_value, sqnr(x, c.decompress())))
    return out


def table(windows: int = 8, bits: tuple[int, ...] = (2, 3, 4)) -> str:
    signals = {**kv_cache(windows), "sine mix (48000 samples)": smooth_signal(),
               "WikiText-2 bytes (200000)": bytes_signal()}
    lines = ["| signal | method | bits / value | SQNR dB | vs uniform, same bits |",
             "|---|---|---:|---:|---:|"]
    for name, x in signals.items():
        base = {}
        for label, bpv, db in rows(x, list(bits)):
            b = label.split()[-1]
            if label.startswith("uniform"):
                base[b] = db
            lines.append(f"| {name} | {label} | {bpv:.3f} | {db:.2f} | "
                         f"{db - base[b]:+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m qkern.tools.reports.signal",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=8, help="KV cache windows of 256 bytes")
    p.add_argument("--bits", default="2,3,4", help="comma-separated code widths (2..8)")
    a = p.parse_args(argv)
    print(table(a.windows, tuple(int(b) for b in a.bits.split(","))))


if __name__ == "__main__":
    main()
