"""``qkern quantize MODEL_DIR OUT --method gptq --bits 4 ...``: a transformers model folder
quantized with one of the LLM methods and written in a format other programs load."""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import sys
import time
from pathlib import Path

from torch import nn

from .. import export, quantize_model, streaming
from ..models import load_pretrained
from ..quantization import (
    SequentialQuantizer,
    quantizer_for,
    registered_configs,
    text_calibration,
)
from .cmdutil import (
    UsageError,
    add_threads,
    apply_threads,
    checkpoint_kind,
    context_length,
    fmt_bytes,
    load_tokenizer,
    path_bytes,
    positive_int,
    shipped_text,
    vocab_size,
)
from .launch import add_nproc, in_launch, init_group, relaunch

__all__ = ["FIXED_W8", "GGUF_TYPES", "METHODS", "add_parser", "build_config", "run"]

#: CLI method name -> the registered config class (qkern.quantization.registered_configs())
METHODS = {"rtn": "RTNConfig", "gptq": "GPTQConfig", "awq": "AWQConfig", "hqq": "HQQConfig",
           "omniquant": "OmniQuantConfig", "zeroquant": "ZeroQuantConfig",
           "rotation": "RotationConfig", "smoothquant": "SmoothQuantConfig",
           "llm_int8": "LLMInt8Config"}
#: methods whose weights are int8 per output channel whatever the options (W8A8 kernels)
FIXED_W8 = {"smoothquant": "SmoothQuant W8A8", "llm_int8": "LLM.int8()"}
FORMATS = ("qkern", "gptq", "awq", "compressed-tensors", "gguf")
#: qkern.interop.gguf.TYPES (kept equal by tests/test_cli_quantize.py; that module needs the
#: optional gguf package, which `qkern --help` must not)
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K")
DEFAULT_BITS, DEFAULT_GROUP = 4, 128
BITS = (2, 3, 4, 8)  # what the fused kernels run: int2-4 in groups of 32k, int8 per channel
_UNSET = object()  # --group-size not given ('channel' gives None)


def _group(text: str) -> int | None:
    if text.lower() in ("none", "channel", "-1", "0"):
        return None
    try:
        g = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a group size (a positive int, or "
                                         "'channel' for one scale per output channel)") from None
    if g < 1:
        raise argparse.ArgumentTypeError(f"group size must be positive, got {g}")
    return g


def add_parser(sub) -> argparse.ArgumentParser:
    known = [m for m, c in METHODS.items() if c in registered_configs()]
    p = sub.add_parser(
        "quantize", help="quantize a transformers model folder (GPTQ, AWQ, RTN, ...) and write it",
        description="Load a local transformers model folder (float), quantize its transformer "
                    "blocks' linears with METHOD block by block on calibration text (a progress "
                    "bar and one line per layer on stderr), write OUT in --format and print a "
                    "summary: size before/after, time, peak memory. Embeddings and the LM head "
                    "stay float. The folder on disk is never modified.",
        epilog="example: qkern quantize models/wikitext-bytelm q4-out --method gptq --bits 4 "
               "--group-size 32 --samples 32 --seqlen 256. Exit status: 0 ok, 1 failure, "
               "2 usage (bad option or combination, missing folder).")
    p.add_argument("model", metavar="MODEL_DIR", help="local transformers model folder "
                   "(config.json + model.safetensors), float weights")
    p.add_argument("out", metavar="OUT", help="output folder (a file for --format gguf, "
                   "e.g. model.gguf)")
    p.add_argument("--method", required=True, choices=known, metavar="METHOD",
                   help=f"quantization method, one of: {', '.join(known)} "
                        "(docs/llm.md describes each)")
    p.add_argument("--bits", type=int, default=None, choices=BITS,
                   help=f"weight bits, one of 2, 3, 4, 8 (the fused kernels; default "
                        f"{DEFAULT_BITS}; smoothquant and llm_int8 are int8 and refuse other "
                        "values)")
    p.add_argument("--group-size", type=_group, default=_UNSET, metavar="G",
                   help=f"weights per scale along the input dimension (a multiple of 32), or "
                        f"'channel' for one scale per output channel (default {DEFAULT_GROUP}; "
                        "channel for 8 bits; a layer whose width G does not divide gets "
                        "per-channel scales)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric grid, no zero point (default: the method's own: gptq, "
                          "rtn, zeroquant, rotation symmetric; awq, hqq, omniquant asymmetric)")
    sym.add_argument("--asym", dest="sym", action="store_false",
                     help="asymmetric grid with a zero point per group")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration text file (default: the shipped WikiText-2 "
                        "wiki.valid.tokens for byte-level models (vocab 256); other models "
                        "need --calib for the methods that measure activations)")
    p.add_argument("--samples", type=positive_int, default=128, metavar="N",
                   help="calibration samples (windows cut from the text; default: 128)")
    p.add_argument("--seqlen", type=positive_int, default=None, metavar="L",
                   help="tokens per calibration sample (default: 512, or the model's context "
                        "length when shorter)")
    p.add_argument("--tokenizer", default=None, metavar="bytes|DIR",
                   help="'bytes' (token id = byte value) or a folder holding tokenizer.json "
                        "(default: bytes for vocab-256 models, else MODEL_DIR's tokenizer.json)")
    p.add_argument("--format", default="qkern", choices=FORMATS,
                   help="output format: qkern (a transformers save_pretrained folder on "
                        "qkern's kernels), gptq, awq, compressed-tensors (vLLM), gguf "
                        "(llama.cpp); default: qkern")
    p.add_argument("--gguf-type", default=None, choices=GGUF_TYPES, metavar="TYPE",
                   help=f"GGUF tensor type of the block linears (--format gguf only; default "
                        f"Q4_0): {', '.join(GGUF_TYPES)}")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_nproc(p)
    p.add_argument("--memory-limit", type=_size, default=None, metavar="BYTES",
                   help="--format qkern: bytes of one block's calibration activations kept in "
                        "memory; past it they are offloaded to files in OUT (e.g. 512MB, "
                        "2GiB; default: no limit). The weights are read one block at a time "
                        "whatever this says (docs/streaming.md)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--resume", dest="resume", action="store_true", default=True,
                     help="--format qkern: an OUT left by an interrupted run goes on from its "
                          "first unfinished block (the default)")
    res.add_argument("--no-resume", dest="resume", action="store_false",
                     help="--format qkern: start over (an existing OUT then needs --overwrite)")
    add_threads(p)
    return p


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _size(text: str) -> int:
    """argparse type: bytes, as an int or with a unit (512MB, 2GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and _UNITS.get(m.group(2).lower())
    if unit is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with a unit: "
                                         "512MB, 2GiB)")
    return int(float(m.group(1)) * unit)


def build_config(method: str, bits: int | None, group: int | None, sym: bool | None,
                 group_given: bool = False):
    """The method's config from the options; UsageError for a combination it refuses."""
    cls = registered_configs().get(METHODS.get(method, ""))
    if cls is None:
        raise UsageError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in FIXED_W8:
        what = FIXED_W8[method]
        if bits not in (None, 8):
            raise UsageError(f"--method {method}: {what} stores int8 weights, --bits {bits} "
                             "does not apply (leave --bits out)")
        if group_given:
            raise UsageError(f"--method {method}: {what} uses one scale per output channel; "
                             "--group-size does not apply")
        if sym is False:
            raise UsageError(f"--method {method}: {what} is symmetric; --asym does not apply")
        return cls()
    bits = DEFAULT_BITS if bits is None else bits
    if bits == 8 and group_given and group is not None:
        raise UsageError("8-bit weights take one scale per output channel (the w8 kernels): "
                         "leave --group-size out or pass --group-size channel")
    if bits < 8 and group_given and group is not None and group % 32:
        raise UsageError(f"--group-size {group}: the int2-4 kernels take groups of a multiple "
                         "of 32 (or 'channel')")
    if bits == 8 and method == "hqq":
        raise UsageError("--method hqq: 8 bits has no fused kernel for HQQ's float zero points; "
                         "use 2-4 bits")
    if bits == 8 and method != "zeroquant":
        if sym is False:
            raise UsageError("8-bit weights run on the w8 kernels, which take symmetric weights "
                             "only: drop --asym")
        sym = True  # AWQ / OmniQuant default to asymmetric grids
    default_group = None if bits == 8 else DEFAULT_GROUP
    kwargs = {"bits": bits, "group_size": group if group_given else default_group}
    if sym is not None:
        kwargs["sym"] = sym
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--method {method}: {e}") from None


def _check_out(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if args.gguf_type is not None and args.format != "gguf":
        raise UsageError("--gguf-type needs --format gguf")
    if args.format == "gguf" and out.is_dir():
        raise UsageError(f"{out} is a folder; GGUF is one file (e.g. {out}/model.gguf)")
    goes_on = _streams(args) and args.resume and streaming.run_state(out) == "unfinished"
    if out.exists() and not args.overwrite and not goes_on:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if not out.resolve().parent.is_dir():
        raise UsageError(f"{out.parent}: no such folder")
    if out.resolve() == Path(args.model).resolve():
        raise UsageError("OUT is MODEL_DIR; write the quantized model elsewhere")
    return out


def _calibration(args: argparse.Namespace, model: nn.Module, config, log) -> list | None:
    q = quantizer_for(config)
    needs = q.needs_calibration()
    uses = needs is not None or isinstance(q, SequentialQuantizer)
    vocab = vocab_size(model)
    ctx = context_length(model)
    seqlen = args.seqlen or min(512, ctx or 512)
    if ctx is not None and seqlen > ctx:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's context length ({ctx})")
    if args.calib is None and vocab != 256:
        if needs:
            raise UsageError(f"--method {args.method} {needs}: pass --calib FILE (a text file; "
                             f"the model's vocabulary has {vocab} tokens, so the shipped "
                             "byte-level WikiText default does not apply)")
        log(f"no calibration (--method {args.method} needs none; --calib FILE shows "
            "per-layer errors)")
        return None
    if not uses:
        return None
    text = Path(args.calib) if args.calib else shipped_text("valid")
    if not text.is_file():
        raise UsageError(f"--calib {text}: no such file")
    tok = load_tokenizer(args.tokenizer, args.model, vocab)
    try:
        cal = text_calibration(text, tok, n_samples=args.samples, seqlen=seqlen)
    except ValueError as e:
        raise UsageError(str(e)) from None
    top = max(int(c.max()) for c in cal)
    if top >= vocab:
        raise UsageError(f"the tokenizer gives token id {top}, the model's vocabulary has "
                         f"{vocab} tokens: --tokenizer does not belong to this model")
    log(f"calibration: {len(cal)} samples x {seqlen} tokens from {text}")
    return cal


def _streams(args: argparse.Namespace) -> bool:
    """--format qkern from a safetensors folder runs qkern.quantize_pretrained (block by
    block from disk); other formats and .bin checkpoints load the whole model."""
    m = Path(args.model)
    return args.format == "qkern" and ((m / "model.safetensors").is_file() or
                                       (m / "model.safetensors.index.json").is_file())


def _float_bytes(model: nn.Module) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or not t.is_floating_point():  # a tied weight counts once
            continue
        seen.add(id(t))
        n += t.numel() * t.element_size()
    return n


def _peak_rss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def _remove(out: Path) -> None:
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    else:
        out.unlink()


def run(args: argparse.Namespace) -> int:
    rc = relaunch(args)
    if rc is not None:
        return rc
    apply_threads(args)
    rank = init_group()

    def log(msg: str) -> None:
        if rank == 0:
            print(f"qkern quantize: {msg}", file=sys.stderr, flush=True)

    given = args.group_size is not _UNSET
    config = build_config(args.method, args.bits, args.group_size if given else None, args.sym,
                          group_given=given)
    if args.method in FIXED_W8 and args.bits == 8:
        log(f"{FIXED_W8[args.method]}: int8 weights per output channel")
    out = _check_out(args)
    kind = checkpoint_kind(args.model)
    if kind != "float" or Path(args.model).is_file():
        raise UsageError(f"{args.model}: a {kind} checkpoint; qkern quantize takes a float "
                         "transformers model folder")
    if args.memory_limit is not None and args.format != "qkern":
        raise UsageError("--memory-limit applies to --format qkern (the streamed path)")
    t0 = time.perf_counter()
    stream = _streams(args) and not in_launch()  # torchrun ranks quantize in memory
    model = streaming.skeleton(args.model) if stream else load_pretrained(args.model)
    before = _float_bytes(model)
    cal = _calibration(args, model, config, log)
    log(f"config: {config}")
    t1 = time.perf_counter()
    if stream:
        if out.exists() and not (args.resume and streaming.run_state(out) == "unfinished"):
            _remove(out)  # --overwrite (checked above)
        result = streaming.quantize_pretrained(args.model, config, out, cal,
                                               memory_limit=args.memory_limit,
                                               resume=args.resume, progress=True)
        if result.resumed_from:
            log(f"resumed at block {result.resumed_from} of an interrupted run in {out}")
        written, report = out, result.report
        t2 = t3 = time.perf_counter()
    else:
        qmodel = quantize_model(model, config, cal, inplace=True, progress=True)
        t2 = time.perf_counter()
        if rank != 0:  # every rank holds the same model: rank 0 writes it
            return 0
        options = {"overwrite": args.overwrite}
        if args.format == "gguf":
            options["type"] = args.gguf_type or "Q4_0"
        written = export(qmodel, out, format=args.format, **options)
        t3 = time.perf_counter()
        report = getattr(qmodel, "qkern_report", None) or []
    after = path_bytes(written)
    errs = [r.error for r in report if getattr(r, "error", None) is not None]
    lines = [
        f"quantized  {args.model} -> {written} ({args.format})",
        f"method     {type(config).__name__}" + (f", {len(report)} layers" if report else ""),
        f"size       {fmt_bytes(before)} float weights -> {fmt_bytes(after)} written "
        f"({before / max(after, 1):.2f}x smaller)",
        f"time       {t3 - t0:.1f} s (load + calibration data {t1 - t0:.1f} s, " + (
            f"quantize + write block by block {t2 - t1:.1f} s)" if stream else
            f"quantize {t2 - t1:.1f} s, write {t3 - t2:.1f} s)"),
        f"peak mem   {fmt_bytes(_peak_rss())} (max resident set size of this process)",
    ]
    if errs:
        lines.insert(2, f"layer err  mean {sum(errs) / len(errs):.2e}, max {max(errs):.2e} "
                        "(relative output error on the calibration inputs)")
    print("\n".join(lines))
    return 0
