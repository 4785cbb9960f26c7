"""``qkern bench decode --model synthetic-337m``: decode speed of a Llama the size people run on
CPUs (hidden 2048, 4 layers, intermediate 5632, 16 heads, vocab 32000: 337M parameters, 1.35 GB
in float32), random weights (seeded), fp32 vs quantized, beside llama.cpp on the same shapes.

Every scheme replaces all the Linear layers (``lm_head`` included) and generates ``--tokens``
greedy tokens after a 16-token prompt with a KV cache, batch 1 (every matmul is a GEMV reading
its weights from memory: 1.09 GB per token in float32, 0.15 GB in int4 g128). Decode tokens/s is
the median of alternating repeats; the weight bytes and the memory roofline (weight bytes per
token / read bandwidth measured in the same run) are printed beside it.

llama.cpp (llama-cpp-python, where importable) runs the GGUF that ``qkern.export`` writes from
the int4 g32 model as Q4_0 (the same codes; fp16 scales; token embeddings in Q4_0 too) with
the same threads, timed the same way (one ``eval`` of the prompt, then one token per ``eval``).
Prefill (prompt processing) is one forward of a 256-token prompt, all positions' logits, from
an empty cache: ``model(ids)`` for the qkern / torch schemes, one ``eval`` for llama.cpp.
Random weights carry no quality figure: the bench only times.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ... import set_num_threads
from ...interop import export
from ...models import Llama
from ...models.llama import LlamaConfig
from ...nn import QuantLinear
from ..weights import linear_weight_bytes
from .schemes import build, kernels_of
from .timing import Probe, machine_line, time_alternating

CONFIG = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                     max_position_embeddings=512)
PROMPT = 16
PREFILL = 256  # tokens of the prefill (prompt processing) forward, at most the model's context

SCHEMES: list[tuple[str, dict | str | None]] = [
    ("fp32 (torch F.linear)", None),
    ("torch dynamic int8 (fbgemm)", "torch"),
    ("qkern int4 g128 fast", {"fmt": "int4", "group_size": 128, "mode": "fast"}),
    ("qkern int4 g128 exact", {"fmt": "int4", "group_size": 128}),
    ("qkern int4 g32 fast (as Q4_0)", {"fmt": "int4", "group_size": 32, "mode": "fast"}),
    ("qkern W8A8 dynamic", {"fmt": "int8", "group_size": None, "act": "int8_dynamic"}),
    ("qkern W8A16 int8 per-channel", {"fmt": "int8", "group_size": None}),
    ("qkern fp8_e4m3 per-channel", {"fmt": "fp8_e4m3", "group_size": None}),
    ("qkern ternary per-channel", {"fmt": "ternary", "group_size": None}),
    ("qkern nf4 b64", {"fmt": "nf4", "group_size": 64}),
    ("qkern nf4 b64 fast", {"fmt": "nf4", "group_size": 64, "mode": "fast"}),
    ("qkern int3 g128 fast", {"fmt": "int3", "group_size": 128, "mode": "fast"}),
    ("qkern int2 g128 fast", {"fmt": "int2", "group_size": 128, "mode": "fast",
                              "symmetric": False}),
    # GPTVQ layouts, 2 bits per weight in the codes (random codes and codebooks: timing only)
    ("qkern VQ d4 2b, 256-entry codebook per layer", {"vq": {"dim": 4, "bits": 2,
                                                             "group_rows": None}}),
    ("qkern VQ d2 2b, 16-entry codebook per 16 rows", {"vq": {"dim": 2, "bits": 2,
                                                              "group_rows": 16}}),
    ("qkern VQ d4 2b per layer, fast (int8)", {"vq": {"dim": 4, "bits": 2, "group_rows": None,
                                                      "mode": "fast"}}),
    ("qkern VQ d2 2b per 16 rows, fast (int8)", {"vq": {"dim": 2, "bits": 2, "group_rows": 16,
                                                        "mode": "fast"}}),
]
Q4_0_SOURCE = "qkern int4 g32 fast (as Q4_0)"


def synthetic_llama(seed: int = 0, config: LlamaConfig = CONFIG) -> Llama:
    """The 337M-parameter Llama (or ``config``'s) with N(0, 0.02) weights (norms 1), float32,
    eval mode."""
    torch.manual_seed(seed)
    model = Llama(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def _llama_cpp(model: nn.Module, threads: int, n_ctx: int, n_batch: int, tmp: Path):
    """(llama_cpp.Llama over the Q4_0 export, the bytes of its Linear weights), or None
    without the package."""
    try:
        from llama_cpp import Llama as LlamaCpp
    except ImportError:
        return None
    path = tmp / "synthetic-q4_0.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, path, format="gguf", type="Q4_0", vocab="none")
    llm = LlamaCpp(str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                   n_threads_batch=threads, logits_all=True, verbose=False)
    # bytes a decode step reads: the Linear layers' Q4_0 blocks (18 bytes per 32 weights)
    return llm, sum(m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, QuantLinear)) * 18 // 32


def llama_cpp_prefill(llm, prompt: list[int]) -> None:
    """One ``eval`` of ``prompt`` from an empty cache (llama.cpp's prompt processing)."""
    llm.reset()
    llm.eval(prompt)


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """Greedy decode of ``n`` tokens by llama-cpp-python after ``prompt`` (from an empty cache)."""
    llama_cpp_prefill(llm, prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def run_decode_synth(threads: int, repeats: int, n_tokens: int, schemes=SCHEMES,
                     llama_cpp: bool = True, config: LlamaConfig = CONFIG) -> str:
    torch.set_num_threads(threads)
    set_num_threads(threads)
    model = synthetic_llama(config=config)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (PROMPT,), generator=gen)
    n_pre = min(PREFILL, config.max_position_embeddings)
    prefill = torch.randint(0, config.vocab_size, (1, n_pre), generator=gen)
    built: dict[str, nn.Module] = {}
    for name, spec in schemes:
        built[name] = build(model, spec) if spec is not None else model
    calls = {n: (lambda m=m: m.generate(prompt, n_tokens)) for n, m in built.items()}
    pre = {n: (lambda m=m: m(prefill)) for n, m in built.items()}
    sizes = {n: linear_weight_bytes(m) for n, m in built.items()}
    notes = {n: kernels_of(m) for n, m in built.items()}
    with tempfile.TemporaryDirectory() as tmp:
        cpp = _llama_cpp(built[Q4_0_SOURCE], threads, max(PROMPT + n_tokens, n_pre) + 8,
                         max(PROMPT, n_pre), Path(tmp)) \
            if llama_cpp and Q4_0_SOURCE in built else None
        if cpp is not None:
            llm, nbytes = cpp
            ids, pre_ids = prompt.tolist(), prefill[0].tolist()
            name = "llama.cpp Q4_0 (llama-cpp-python)"
            calls[name] = lambda: llama_cpp_greedy(llm, ids, n_tokens)
            pre[name] = lambda: llama_cpp_prefill(llm, pre_ids)
            sizes[name] = nbytes
            notes[name] = "ggml Q4_0"
        t, _ = time_alternating(calls, repeats, 1)
        with torch.inference_mode():
            t_pre, _ = time_alternating(pre, repeats, 1)
    probe = Probe.make(256 << 20)
    for _ in range(5):
        t0 = time.perf_counter()
        probe.run_sum()
        probe.sum_s.append(time.perf_counter() - t0)
    read = probe.read_gbs()
    base = next(iter(calls))
    lines = [machine_line(threads), "",
             f"Model: synthetic Llama, {sum(p.numel() for p in model.parameters()):,} "
             f"parameters (hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
             f"vocab {config.vocab_size}), random weights; decode: {n_tokens} greedy tokens "
             f"after a {PROMPT}-token prompt, batch 1, KV cache; prefill: one forward of a "
             f"{n_pre}-token prompt (all positions' logits); median of {repeats} alternating "
             f"repeats. Read bandwidth (same run): {read:.1f} GB/s.", "",
             "| scheme | kernels | linear weights MB | decode tok/s | vs fp32 | roofline tok/s "
             "| % of roofline | prefill tok/s | vs fp32 |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name in calls:
        tok_s = n_tokens / t[name]
        roof = read * 1e9 / sizes[name]
        lines.append(f"| {name} | {notes[name]} | {sizes[name] / 1e6:.0f} | {tok_s:.1f} | "
                     f"{t[base] / t[name]:.2f}x | {roof:.0f} | {100 * tok_s / roof:.0f} % | "
                     f"{n_pre / t_pre[name]:.0f} | {t_pre[base] / t_pre[name]:.2f}x |")
    return "\n".join(lines)
