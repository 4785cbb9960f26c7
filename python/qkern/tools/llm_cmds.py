"""``qkern quantize``, ``qkern eval`` and ``qkern inspect``: an LLM folder quantized, measured
and looked into from the command line.

    qkern quantize MODEL_DIR OUT --method gptq --bits 4 --group-size 128 [--format gptq]
    qkern eval OUT [--data FILE] [--reference MODEL_DIR]
    qkern inspect OUT [--json]

Exit status: 0 done, 1 the work failed, 2 a usage error (bad option, unknown method, missing
folder, a combination no kernel runs). Errors are one line on stderr (``QKERN_DEBUG=1`` shows
the traceback); progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..interop import FORMATS, export, from_pretrained
from ..models import load_pretrained
from ..models.assets import WIKITEXT_TEXT, shipped_path
from ..nn import QuantLinear
from ..quantization import quantize_model, registered_configs, text_calibration

__all__ = ["METHODS", "eval_main", "inspect_main", "quantize_main"]

#: --method -> the registered config class name
METHODS = {"rtn": "RTNConfig", "gptq": "GPTQConfig", "awq": "AWQConfig", "hqq": "HQQConfig",
           "omniquant": "OmniQuantConfig", "smoothquant": "SmoothQuantConfig",
           "zeroquant": "ZeroQuantConfig", "llm_int8": "LLMInt8Config"}
#: who loads each checkpoint kind (qkern inspect)
CONSUMERS = {"qkern": "qkern.from_pretrained, transformers (after import qkern.hf)",
             "gptq": "qkern.from_pretrained, transformers + optimum/gptqmodel, vLLM, GPTQModel",
             "awq": "qkern.from_pretrained, transformers + autoawq, vLLM",
             "compressed-tensors": "qkern.from_pretrained, vLLM, transformers",
             "gguf": "qkern.from_pretrained, llama.cpp (llama-cpp-python, llama-cli)"}


class UsageError(ValueError):
    """A bad command line: exit status 2."""


def _run(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # one line, not a traceback (QKERN_DEBUG=1 shows it)
        if os.environ.get("QKERN_DEBUG"):
            traceback.print_exc()
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _folder(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path!r} does not exist")
    return p


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _load_any(path: Path) -> nn.Module:
    """A float folder through transformers, anything quantized through qkern.from_pretrained."""
    cfg = path / "config.json"
    if path.is_dir() and cfg.is_file() and "quantization_config" not in json.loads(
            cfg.read_text()):
        return load_pretrained(path)
    return from_pretrained(path)


def _bytes_or_default(data: str | None, split: str) -> bytes:
    if data is None:
        return shipped_path(WIKITEXT_TEXT.format(split=split)).read_bytes()
    p = Path(data)
    if not p.is_file():
        raise UsageError(f"--data/--calib {data!r} is not a file")
    return p.read_bytes()


def _vocab(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "vocab_size", 0) or 0)


# ---- qkern quantize -----------------------------------------------------------------------

def quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkern quantize", description="Quantize a local transformers model folder block by "
        "block (docs/llm.md) and write it in a format its runtime loads.",
        epilog="Exit status: 0 written, 1 failed, 2 usage error.")
    p.add_argument("model", metavar="MODEL_DIR", help="a local transformers model folder")
    p.add_argument("out", metavar="OUT", help="the folder (or .gguf file) to write")
    p.add_argument("--method", default="rtn", choices=sorted(METHODS),
                   help="the algorithm (default: rtn)")
    p.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default: 4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="weights per scale along the input; 0 = one per output channel "
                        "(default: 128)")
    p.add_argument("--sym", action="store_true", help="symmetric weights (default: asymmetric)")
    p.add_argument("--calib", metavar="FILE", help="calibration text (default for a byte-level "
                   "model: the shipped WikiText-2 valid text)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default: 64)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--format", default="qkern", choices=sorted(FORMATS),
                   help="what to write (default: qkern, a save_pretrained folder)")
    p.add_argument("--gguf-type", default="Q4_0", help="GGUF tensor type (default: Q4_0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def _method_config(args: argparse.Namespace):
    cls = registered_configs().get(METHODS[args.method])
    if cls is None:
        raise UsageError(f"method {args.method!r} is not available in this qkern")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    if "bits" in fields:
        kw["bits"] = args.bits
    elif args.bits != 4:
        raise UsageError(f"--method {args.method} has no --bits (its weights are int8)")
    if "group_size" in fields:
        kw["group_size"] = args.group_size or None
    if "sym" in fields:
        kw["sym"] = args.sym
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quantize_main(argv: Sequence[str]) -> int:
    args = quantize_parser().parse_args(list(argv))

    def body() -> int:
        src = _folder(args.model, "MODEL_DIR")
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise UsageError(f"{out} exists; pass --overwrite to replace it")
        cfg = _method_config(args)
        t0 = time.time()
        model = load_pretrained(src)
        n_float = sum(p.numel() * 4 for p in model.parameters())
        cal = None
        if args.calib is not None or _vocab(model) == 256:
            cal = text_calibration(_bytes_or_default(args.calib, "valid"), "bytes",
                                   n_samples=args.samples, seqlen=args.seqlen)
        elif args.method != "rtn" and args.method != "hqq":
            raise UsageError(f"--method {args.method} needs --calib FILE (a text file) for a "
                             "model that is not byte-level")
        q = quantize_model(model, cfg, cal, inplace=True, progress=True)
        opts = {"type": args.gguf_type} if args.format == "gguf" else {}
        export(q, out, format=args.format, overwrite=args.overwrite, **opts)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{src} -> {out} ({args.format}): {type(cfg).__name__} bits={args.bits} "
              f"group_size={args.group_size or 'channel'}; float32 weights {n_float / 2**20:.1f} "
              f"MiB -> {_size(out) / 2**20:.1f} MiB written; {time.time() - t0:.1f} s; "
              f"peak memory {peak:.0f} MiB")
        return 0

    return _run("qkern quantize", body)


# ---- qkern eval ---------------------------------------------------------------------------

def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkern eval", description="Bits per byte (byte-level models) or perplexity of a "
        "model folder or .gguf file on a text, and optionally its KL divergence to a reference "
        "model.", epilog="Exit status: 0 done, 1 failed, 2 usage error.")
    p.add_argument("model", metavar="MODEL", help="a model folder (float or quantized) or .gguf")
    p.add_argument("--data", metavar="FILE",
                   help="text to evaluate on (default: the shipped WikiText-2 test text)")
    p.add_argument("--windows", type=int, default=48, help="windows (default: 48)")
    p.add_argument("--seqlen", type=int, default=256, help="bytes per window (default: 256)")
    p.add_argument("--reference", metavar="MODEL",
                   help="also print the mean per-token KL(reference || model) in nats")
    return p


def evaluate(model: nn.Module, ids: torch.Tensor, ref: nn.Module | None = None
             ) -> tuple[float, float | None]:
    """(mean next-token cross-entropy in nats, mean KL(ref || model) or None) over ``ids``."""
    nll, kl, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], 8):
            x = ids[i:i + 8]
            lq = F.log_softmax(_logits(model, x), -1)
            nll += float(F.nll_loss(lq[:, :-1].reshape(-1, lq.shape[-1]), x[:, 1:].reshape(-1),
                                    reduction="sum"))
            n += x[:, 1:].numel()
            if ref is not None:
                lp = F.log_softmax(_logits(ref, x), -1)[:, :-1]
                kl += float((lp.exp() * (lp - lq[:, :-1])).sum())
    return nll / n, (None if ref is None else kl / n)


def eval_main(argv: Sequence[str]) -> int:
    args = eval_parser().parse_args(list(argv))

    def body() -> int:
        model = _load_any(_folder(args.model, "MODEL")).eval()
        if _vocab(model) != 256:
            raise UsageError("qkern eval measures byte-level models (vocab 256) on raw text; "
                             f"{args.model} has vocab {_vocab(model)}")
        data = _bytes_or_default(args.data, "test")
        n = min(args.windows, len(data) // args.seqlen)
        if n < 1:
            raise UsageError(f"the text holds fewer than --seqlen={args.seqlen} bytes")
        ids = torch.frombuffer(bytearray(data[:n * args.seqlen]), dtype=torch.uint8).long()
        ref = None if args.reference is None else _load_any(_folder(args.reference,
                                                                    "--reference")).eval()
        nll, kl = evaluate(model, ids.view(n, args.seqlen), ref)
        line = (f"{args.model}: {nll / math.log(2):.4f} bits per byte (perplexity "
                f"{math.exp(nll):.3f}) on {n} x {args.seqlen} bytes")
        print(line + ("" if kl is None else f"; KL to {args.reference} {kl:.4f} nats/token"))
        return 0

    return _run("qkern eval", body)


# ---- qkern inspect ------------------------------------------------------------------------

def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkern inspect", description="What a quantized checkpoint holds: its format, each "
        "layer's number format, group size, bits per weight and the kernel it runs on here, and "
        "who can load it.", epilog="Exit status: 0 done, 1 failed, 2 usage error.")
    p.add_argument("path", metavar="FILE_OR_DIR", help="a checkpoint folder or .gguf file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _kind(path: Path) -> str:
    if path.is_file():
        return "gguf" if path.read_bytes()[:4] == b"GGUF" else "unknown"
    cfg = path / "config.json"
    qc = json.loads(cfg.read_text()).get("quantization_config", {}) if cfg.is_file() else {}
    return str(qc.get("quant_method", "float" if cfg.is_file() else "unknown"))


def inspect_main(argv: Sequence[str]) -> int:
    args = inspect_parser().parse_args(list(argv))

    def body() -> int:
        path = _folder(args.path, "FILE_OR_DIR")
        kind = _kind(path)
        if kind in ("float", "unknown"):
            raise UsageError(f"{path} is not a quantized checkpoint qkern knows ({kind})")
        model = from_pretrained(path)
        rows = []
        for name, m in model.named_modules():
            if not isinstance(m, QuantLinear):
                continue
            q = m.weight_q
            rows.append({"layer": name, "format": q.format.name, "group_size": q.group_size,
                         "symmetric": q.zero_point is None, "shape": list(q.shape),
                         "bits_per_weight": round(q.bits_per_element, 3), "kernel": m.kernel,
                         "act": m.act})
        info = {"path": str(path), "format": kind, "size_bytes": _size(path),
                "loaded_by": CONSUMERS.get(kind, "qkern.from_pretrained"), "layers": rows}
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"{path}: {kind} checkpoint, {info['size_bytes'] / 2**20:.2f} MiB, "
              f"{len(rows)} quantized layers; loaded by {info['loaded_by']}")
        cols = ["layer", "format", "group_size", "symmetric", "bits_per_weight", "kernel", "act"]
        width = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c)
                 for c in cols}
        print("  ".join(c.ljust(width[c]) for c in cols))
        for r in rows:
            print("  ".join(str(r[c]).ljust(width[c]) for c in cols))
        return 0

    return _run("qkern inspect", body)
