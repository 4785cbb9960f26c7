"""What the practitioner commands (``qkern quantize`` / ``eval`` / ``inspect``) share: the
usage error and the one-line error report with its exit status, telling what a path holds,
loading any checkpoint qkern can run, tokenizers, and sizes.

Exit status: 0 ok, 1 failure (the work went wrong), 2 usage (a bad option, a bad combination,
a missing file or folder), 130 interrupted. Errors are one line on stderr; ``QKERN_DEBUG=1``
prints the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import from_pretrained, set_num_threads
from ..models import load_pretrained
from ..models.assets import WIKITEXT_TEXT, shipped_path
from ..quantization import byte_tokens

__all__ = ["CONSUMERS", "UsageError", "add_threads", "apply_threads", "checkpoint_kind",
           "context_length", "encode", "fmt_bytes", "load_any", "load_tokenizer", "logits",
           "path_bytes", "positive_int", "read_text", "run_guarded", "shipped_text",
           "vocab_size"]

#: which programs load a checkpoint of each kind (docs/serving/)
CONSUMERS = {
    "qkern": ["qkern.from_pretrained", "transformers (after import qkern)"],
    "gptq": ["transformers (optimum + gptqmodel)", "vLLM", "GPTQModel", "AutoGPTQ",
             "qkern.from_pretrained"],
    "awq": ["transformers (gptqmodel)", "vLLM", "GPTQModel", "AutoAWQ", "qkern.from_pretrained"],
    "compressed-tensors": ["vLLM", "transformers (compressed-tensors)", "llm-compressor",
                           "qkern.from_pretrained"],
    "gguf": ["llama.cpp (llama-cli, llama-server, llama-cpp-python)", "qkern.from_pretrained"],
    "onnx": ["onnxruntime"],
    "qkern-file": ["qkern.load(path, float_model)"],
    "float": ["transformers", "vLLM", "qkern quantize"],
}
QUANT_METHODS = {"qkern": "qkern", "gptq": "gptq", "awq": "awq",
                 "compressed-tensors": "compressed-tensors"}


class UsageError(Exception):
    """A bad option, a bad combination or a missing input: exit status 2."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and e.args:
        text = f"missing key {e.args[0]!r}"
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts)


def run_guarded(name: str, fn: Callable[[argparse.Namespace], int | None],
                args: argparse.Namespace) -> int:
    """Runs ``fn(args)``; turns its exceptions into one line on stderr and an exit status."""
    debug = bool(os.environ.get("QKERN_DEBUG"))
    try:
        rc = fn(args)
        return 0 if rc is None else rc
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"qkern {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qkern {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is one line, the status says which
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (QKERN_DEBUG=1 shows the traceback)"
        print(f"qkern {name}: error: {type(e).__name__}: {_one_line(e)}{hint}", file=sys.stderr)
        return 1


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch and qkern's kernels (default: torch's, i.e. "
                        "$OMP_NUM_THREADS or the cores; on a busy machine 1 can be much faster)")


def apply_threads(args: argparse.Namespace) -> None:
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise UsageError(f"--threads must be a positive integer, got {n}")
    try:
        set_num_threads(n)
    except ValueError as e:
        raise UsageError(f"--threads: {e}") from None
    torch.set_num_threads(n)


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(d, dict):
        raise UsageError(f"{p}: not a JSON object")
    return d


def _safetensors_metadata(p: Path) -> dict | None:
    try:
        from safetensors import safe_open
        with safe_open(str(p), "pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - not a safetensors file
        return None


def checkpoint_kind(path: str | os.PathLike) -> str:
    """What ``path`` holds: "qkern", "gptq", "awq", "compressed-tensors" (quantized folders),
    "float" (a transformers folder or .safetensors file without quantization), "gguf",
    "onnx", "qkern-file" (``qkern.save``). UsageError for anything else."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or folder")
    if p.is_file():
        with open(p, "rb") as fh:
            head = fh.read(8)
        if head[:4] == b"GGUF":
            return "gguf"
        if p.suffix == ".onnx":
            return "onnx"
        meta = _safetensors_metadata(p)
        if meta is not None:
            return "qkern-file" if "qkern_layers" in meta else "float"
        raise UsageError(f"{p}: not a checkpoint qkern knows (a GGUF, .onnx or safetensors file, "
                         "or a model folder)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{p}: not a model folder (no config.json)")
    qc = _read_json(cfg).get("quantization_config")
    if isinstance(qc, dict) and qc:
        method = str(qc.get("quant_method", "")).lower()
        if method in QUANT_METHODS:
            return QUANT_METHODS[method]
        raise UsageError(f"{p}: quantization method {method!r} is not one qkern reads "
                         f"({', '.join(QUANT_METHODS)})")
    if (p / "quantize_config.json").is_file():  # AutoGPTQ's older layout
        return "gptq"
    return "float"


def load_any(path: str | os.PathLike, kind: str | None = None) -> nn.Module:
    """The model at ``path`` in eval mode: float folders through ``load_pretrained``,
    quantized folders and GGUF files through ``qkern.from_pretrained``."""
    kind = kind or checkpoint_kind(path)
    if kind == "float":
        if Path(path).is_file():
            raise UsageError(f"{path}: a bare .safetensors file has no architecture; give the "
                             "model folder (with config.json)")
        return load_pretrained(path).eval()
    if kind in ("onnx", "qkern-file"):
        how = ("run it with onnxruntime" if kind == "onnx"
               else "load it in Python: qkern.load(path, float_model)")
        raise UsageError(f"{path}: a {kind} checkpoint holds no model qkern can rebuild here; "
                         f"{how}")
    return from_pretrained(path).eval()


def vocab_size(model: nn.Module) -> int:
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    if v is None and hasattr(model, "get_input_embeddings"):
        v = model.get_input_embeddings().num_embeddings
    if v is None:
        raise UsageError("cannot tell the model's vocabulary size (no config.vocab_size)")
    return int(v)


def context_length(model: nn.Module) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Float logits (B, L, V) of a transformers model or qkern's own Llama."""
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out).float()


def load_tokenizer(spec: str | None, model_dir: str | os.PathLike, vocab: int):
    """"bytes", or a ``tokenizers.Tokenizer``: ``spec`` is "bytes", a folder holding
    tokenizer.json, or the file; None: bytes for a vocab-256 model, else the model folder's
    tokenizer.json."""
    if spec == "bytes":
        return "bytes"
    if spec is None:
        if vocab == 256:
            return "bytes"
        mdir = Path(model_dir)
        if mdir.is_dir() and (mdir / "tokenizer.json").is_file():
            spec = str(mdir)
        else:
            raise UsageError(f"the model's vocabulary has {vocab} tokens (not byte-level) and "
                             f"{model_dir} holds no tokenizer.json: pass --tokenizer DIR")
    p = Path(spec)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise UsageError(f"--tokenizer {spec}: no tokenizer.json there")
    try:
        from tokenizers import Tokenizer  # optional: the [demo] extra
    except ImportError:
        raise UsageError("a tokenizer.json needs the tokenizers package: pip install "
                         "tokenizers") from None
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # noqa: BLE001 - the package's parse errors
        raise UsageError(f"{f}: not a tokenizers tokenizer.json ({_one_line(e)})") from None


def encode(tokenizer, text: bytes) -> list[int]:
    if tokenizer == "bytes":
        return byte_tokens(text)
    return list(tokenizer.encode(text.decode("utf-8", errors="replace")).ids)


def shipped_text(split: str) -> Path:
    """The WikiText-2 ``split`` ("test", "valid") shipped with qkern."""
    try:
        return shipped_path(WIKITEXT_TEXT.format(split=split))
    except FileNotFoundError as e:
        raise UsageError(f"{e}; or pass a text file") from None


def read_text(path: str | os.PathLike, option: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option} {p}: no such file")
    return p.read_bytes()


def path_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a file, or of every file under a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
