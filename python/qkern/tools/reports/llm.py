"""LLM post-training quantization on the shipped models: the README's table.

``python -m qkern.tools.reports.llm [--quick] [--methods rtn,gptq,...] [--settings w4g128,...]``
prints Markdown tables:

- models/wikitext-bytelm (a byte-level Llama): bits per byte on WikiText-2 *test* (the first
  48 windows of 256 bytes) for each weight-only method and setting; calibration 64 windows x
  256 bytes of WikiText-2 *valid* (the same for every method);
- models/stories260k: mean per-token KL divergence of the quantized model's next-token
  distribution to the fp32 model's, on sequences sampled from the fp32 model (calibration on
  other sampled sequences: the model has no tokenizer shipped);
- activation quantization rows (SmoothQuant W8A8, LLM.int8, rotation W4A8) where those
  methods are registered.

The bytelm's MLP input (672) is not a multiple of 128 or 64: its down_proj is stored with one
group per row at those settings (noted by the pipeline).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ... import set_num_threads
from ...models import bits_per_byte, load_llama
from ...models.assets import shipped_path
from ...quantization import (
    BaseConfig,
    quantize_model,
    registered_configs,
    rotate_model,
    text_calibration,
)

__all__ = ["METHODS", "SETTINGS", "TRANSFORMS", "bytelm_table", "kl_table", "main", "method_config",
           "prepare", "quantize", "wikitext_bytes"]

#: weight settings: label -> (bits, group_size)
SETTINGS: dict[str, tuple[int, int | None]] = {
    "w4 g128": (4, 128), "w3 g128": (3, 128), "w4 per-channel": (4, None), "w2 g64": (2, 64)}


def _cfg(name: str, **kw) -> BaseConfig | None:
    cls = registered_configs().get(name)
    return None if cls is None else cls(**kw)


def _rotated(model: nn.Module) -> nn.Module:
    """QuaRot's whole-model Hadamard rotation (folded, plus the online one on down_proj)."""
    return rotate_model(copy.deepcopy(model), seed=0)


def _awq_gptq(bits: int, group: int | None) -> BaseConfig | None:
    gptq = _cfg("GPTQConfig", bits=bits, group_size=group, sym=False)
    return None if gptq is None else _cfg("AWQConfig", bits=bits, group_size=group, sym=False,
                                          then=gptq)


#: method label -> (bits, group) -> config (None where the method is not available); every
#: method with zero points (asymmetric), as the reference implementations run them
METHODS: dict[str, Callable[[int, int | None], BaseConfig | None]] = {
    "RTN": lambda b, g: _cfg("RTNConfig", bits=b, group_size=g, sym=False),
    "GPTQ": lambda b, g: _cfg("GPTQConfig", bits=b, group_size=g, sym=False),
    "AWQ": lambda b, g: _cfg("AWQConfig", bits=b, group_size=g, sym=False),
    "AWQ + GPTQ": _awq_gptq,
    "HQQ": lambda b, g: _cfg("HQQConfig", bits=b, group_size=g),
    "OmniQuant (LWC; 2 epochs)": lambda b, g: _cfg("OmniQuantConfig", bits=b, group_size=g,
                                                   epochs=2),
    "rotation + GPTQ": lambda b, g: _cfg("GPTQConfig", bits=b, group_size=g, sym=False),
}
#: methods that transform the float model first
TRANSFORMS: dict[str, Callable[[nn.Module], nn.Module]] = {"rotation + GPTQ": _rotated}


def method_config(method: str, setting: str) -> BaseConfig | None:
    bits, group = SETTINGS[setting]
    return METHODS[method](bits, group)


def prepare(method: str, model: nn.Module) -> nn.Module:
    """``model``, transformed first where the method asks for it (:data:`TRANSFORMS`)."""
    t = TRANSFORMS.get(method)
    return model if t is None else t(model)


def wikitext_bytes() -> tuple[bytes, bytes]:
    """The shipped WikiText-2 *valid* (calibration) and *test* (evaluation) text."""
    return (shipped_path("data/wikitext-2/wiki.valid.tokens").read_bytes(),
            shipped_path("data/wikitext-2/wiki.test.tokens").read_bytes())


def quantize(model, cfg, cal):
    """``quantize_model`` without progress output or warnings; returns (model, seconds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        q = quantize_model(model, cfg, cal, progress=False)
        return q, time.perf_counter() - t


def bytelm_table(methods: list[str], settings: list[str], n_cal: int = 64) -> str:
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    valid, test = wikitext_bytes()
    cal = text_calibration(valid, "bytes", n_cal, 256)
    with torch.no_grad():
        fp = bits_per_byte(model, test)
    head = "| method | " + " | ".join(settings) + " |"
    lines = ["wikitext-bytelm: bits per byte on WikiText-2 test (48 x 256 bytes; lower is "
             f"better), calibration {n_cal} x 256 bytes of WikiText-2 valid; seconds to "
             "quantize in brackets", "", head, "|" + "---|" * (len(settings) + 1),
             "| fp32 | " + " | ".join(f"{fp:.4f}" for _ in settings) + " |"]
    for m in methods:
        cells = []
        for s in settings:
            cfg = method_config(m, s)
            if cfg is None:
                cells.append("n/a")
                continue
            q, secs = quantize(prepare(m, model), cfg, cal)
            with torch.no_grad():
                cells.append(f"{bits_per_byte(q, test):.4f} ({secs:.0f} s)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sample(model, n: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([[1]])
            for _ in range(length - 1):
                p = F.softmax(model(ids)[0, -1], -1)
                ids = torch.cat([ids, torch.multinomial(p, 1, generator=g).view(1, 1)], 1)
            out.append(ids)
    return out


def _kl(model, q, seqs) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            lp, lq = F.log_softmax(model(s), -1), F.log_softmax(q(s), -1)
            tot += float((lp.exp() * (lp - lq)).sum())
            n += s.numel()
    return tot / n


def kl_table(methods: list[str], settings: list[str]) -> str:
    model = load_llama(shipped_path("models/stories260k"))
    cal = _sample(model, 16, 128, seed=0)
    ev = _sample(model, 16, 128, seed=1)
    lines = ["stories260k: mean KL(fp32 || quantized) per token in nats on 16 x 128 tokens "
             "sampled from the fp32 model (calibration: 16 other sampled sequences; its MLP "
             "input 172 is no multiple of 32, so down_proj stays float)", "",
             "| method | " + " | ".join(settings) + " |", "|" + "---|" * (len(settings) + 1)]
    for m in methods:
        cells = []
        for s in settings:
            cfg = method_config(m, s)
            if cfg is None:
                cells.append("n/a")
                continue
            q, _ = quantize(prepare(m, model), cfg, cal)
            cells.append(f"{_kl(model, q, ev):.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qkern.tools.reports.llm",
                                description="LLM PTQ tables on the shipped models")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated, from: {', '.join(SETTINGS)}")
    p.add_argument("--quick", action="store_true",
                   help="RTN and GPTQ at w4 g128 and w3 g128 only (for make demo)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    a = p.parse_args(argv)
    methods = ["RTN", "GPTQ"] if a.quick else [m.strip() for m in a.methods.split(",")]
    settings = ["w4 g128", "w3 g128"] if a.quick else [s.strip() for s in a.settings.split(",")]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for s in settings:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    print(bytelm_table(methods, settings))
    print()
    print(kl_table(methods, settings))


if __name__ == "__main__":
    main()
