"""``qkern bench decode``: a real model's generation speed and quality, fp32 vs
quantized, in one run.

The model is the byte-level Llama shipped in ``models/wikitext-bytelm`` (4 layers, hidden 256,
3.25M parameters), run by :mod:`qkern.models.llama`. Every scheme replaces all of its
``nn.Linear`` layers (``lm_head`` included) with qkern QuantLinears (or, for the peer, torch's
dynamic int8 Linear) and is measured on the same prompt, with the same threads:

- decode tokens/s: greedy generation of ``--tokens`` bytes after a 64-byte prompt with a KV
  cache (batch 1: every matmul is a GEMV), median of alternating repeats;
- prefill tokens/s: one forward pass over 256 bytes (M = 256 GEMMs);
- bits per byte on WikiText-2 test (the first ``--windows`` windows of 256 bytes), the
  quality the speed is bought with.

The layers are small (256 x 256, 672 x 256): at batch 1 a token costs ~30 matmuls of tens of
microseconds, so framework overhead weighs as much as the kernels. That is what decode of a
small model costs; the per-layer figures of ``qkern bench matmul`` show the kernels.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ... import set_num_threads
from ...models import bits_per_byte, load_llama
from ...models.assets import WIKITEXT_BYTELM, WIKITEXT_TEXT, shipped_path
from ..weights import linear_weight_bytes
from .decode_synth import run_decode_synth
from .schemes import build, kernels_of
from .timing import machine_line, time_alternating

MODEL = WIKITEXT_BYTELM
TEXT = WIKITEXT_TEXT.format(split="test")

# (name, replace_linear spec); None = the fp32 model, "torch" = torch's dynamic int8 peer
SCHEMES: list[tuple[str, dict | str | None]] = [
    ("fp32 (torch F.linear)", None),
    ("torch dynamic int8 (fbgemm)", "torch"),
    ("qkern W8A16 int8 per-channel", {"fmt": "int8", "group_size": None}),
    ("qkern W8A8 dynamic", {"fmt": "int8", "group_size": None, "act": "int8_dynamic"}),
    ("qkern fp8_e4m3 per-channel", {"fmt": "fp8_e4m3", "group_size": None}),
    ("qkern int4 g32 exact", {"fmt": "int4", "group_size": 32}),
    ("qkern int4 g32 fast", {"fmt": "int4", "group_size": 32, "mode": "fast"}),
    ("qkern nf4 g32", {"fmt": "nf4", "group_size": 32}),
    ("qkern nf4 g32 fast", {"fmt": "nf4", "group_size": 32, "mode": "fast"}),
    ("qkern int3 g32", {"fmt": "int3", "group_size": 32}),
    ("qkern int2 g32", {"fmt": "int2", "group_size": 32, "symmetric": False}),
]


def run_decode(threads: int, repeats: int, n_tokens: int, windows: int,
               schemes=SCHEMES) -> str:
    torch.set_num_threads(threads)
    set_num_threads(threads)
    model = load_llama(shipped_path(MODEL))
    text = shipped_path(TEXT).read_bytes()
    prompt = torch.frombuffer(bytearray(text[:64]), dtype=torch.uint8).long()
    prefill = torch.frombuffer(bytearray(text[:256]), dtype=torch.uint8).long().view(1, 256)
    built: dict[str, nn.Module] = {}
    for name, spec in schemes:
        try:
            built[name] = build(model, spec)
        except (ValueError, RuntimeError) as e:  # a format this build cannot run
            print(f"  {name}: skipped ({str(e).splitlines()[0][:100]})")
    decode = {n: (lambda m=m: m.generate(prompt, n_tokens)) for n, m in built.items()}
    with torch.inference_mode():
        pre = {n: (lambda m=m: m(prefill)) for n, m in built.items()}
        t_pre, _ = time_alternating(pre, repeats, 1)
    t_dec, _ = time_alternating(decode, repeats, 1)
    base = next(iter(built))
    lines = [machine_line(threads), "",
             f"Model: {MODEL} ({sum(p.numel() for p in model.parameters()):,} parameters); "
             f"decode: {n_tokens} greedy tokens after a 64-byte prompt, batch 1; prefill: one "
             f"256-byte forward; bits/byte: first {windows} windows of 256 bytes of "
             "wiki.test.tokens; median of alternating repeats.", "",
             "| scheme | kernels | linear weights KiB | bits/byte | decode tok/s | vs fp32 "
             "| prefill tok/s | vs fp32 |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    for name, m in built.items():
        bpb = bits_per_byte(m, text, n_windows=windows)
        dec, pf = n_tokens / t_dec[name], 256 / t_pre[name]
        lines.append(f"| {name} | {kernels_of(m)} | {linear_weight_bytes(m) / 1024:.0f} | "
                     f"{bpb:.4f} | {dec:.0f} | {t_dec[base] / t_dec[name]:.2f}x | {pf:.0f} | "
                     f"{t_pre[base] / t_pre[name]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qkern bench decode",
                                description="wikitext-bytelm decode: fp32 vs quantized")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per repeat")
    p.add_argument("--windows", type=int, default=48, help="256-byte windows for bits/byte")
    p.add_argument("--quick", action="store_true", help="fewer tokens, repeats and windows")
    p.add_argument("--model", choices=("wikitext-bytelm", "synthetic-337m"),
                   default="wikitext-bytelm",
                   help="the shipped byte-level model (speed and quality), or a 337M-parameter "
                        "Llama with random weights (speed only, beside llama.cpp Q4_0)")
    p.add_argument("--no-llama-cpp", action="store_true",
                   help="synthetic-337m: skip llama.cpp even where llama-cpp-python imports")
    a = p.parse_args(argv)
    if a.threads < 1 or a.repeats < 1 or a.tokens < 1 or a.windows < 1:
        p.error("--threads, --repeats, --tokens and --windows must be >= 1")
    if a.quick:
        a.repeats, a.tokens, a.windows = 2, 16, 4
    t0 = time.perf_counter()
    if a.model == "synthetic-337m":
        print(run_decode_synth(a.threads, a.repeats, a.tokens,
                               llama_cpp=not a.no_llama_cpp))
    else:
        print(run_decode(a.threads, a.repeats, a.tokens, a.windows))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0
