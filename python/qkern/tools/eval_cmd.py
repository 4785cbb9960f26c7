"""``qkern eval MODEL [--data FILE] [--reference DIR]``: bits per byte (byte-level models) or
perplexity (tokenized models) of any checkpoint qkern can load, and the mean per-token KL
divergence to a reference model."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cmdutil import (
    UsageError,
    add_threads,
    apply_threads,
    checkpoint_kind,
    context_length,
    encode,
    load_any,
    load_tokenizer,
    logits,
    positive_int,
    read_text,
    shipped_text,
    vocab_size,
)

__all__ = ["add_parser", "evaluate", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="bits per byte / perplexity of a checkpoint, and KL to a reference",
        description="Load a checkpoint (a float transformers folder, a qkern / GPTQ / AWQ / "
                    "compressed-tensors folder or a GGUF file) and print its mean next-token "
                    "loss on the first --windows non-overlapping windows of --seqlen tokens of "
                    "--data: bits per byte for byte-level models (vocab 256), perplexity "
                    "otherwise. With --reference, also the mean per-token KL divergence "
                    "KL(reference || model) in nats on the same windows.",
        epilog="example: qkern eval q4-out --reference models/wikitext-bytelm. Exit status: 0 "
               "ok, 1 failure, 2 usage (bad option, missing file or folder).")
    p.add_argument("model", metavar="MODEL", help="model folder or .gguf file")
    p.add_argument("--data", metavar="FILE", default=None,
                   help="text file to evaluate on (default: the shipped WikiText-2 "
                        "wiki.test.tokens)")
    p.add_argument("--windows", type=positive_int, default=48, metavar="N",
                   help="number of windows (default: 48; fewer when the text is short)")
    p.add_argument("--seqlen", type=positive_int, default=None, metavar="L",
                   help="tokens per window (default: 256, or the model's context length when "
                        "shorter)")
    p.add_argument("--tokenizer", default=None, metavar="bytes|DIR",
                   help="'bytes' or a folder holding tokenizer.json (default: bytes for "
                        "vocab-256 models, else the model folder's tokenizer.json)")
    p.add_argument("--reference", metavar="DIR", default=None,
                   help="reference model (e.g. the float folder the model was quantized from) "
                        "for the KL divergence")
    p.add_argument("--batch", type=positive_int, default=16, metavar="B",
                   help="windows per forward pass (default: 16)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    add_threads(p)
    return p


def evaluate(model: nn.Module, windows: torch.Tensor, reference: nn.Module | None = None,
             batch: int = 16) -> dict:
    """Mean next-token negative log-likelihood (nats) of ``model`` over ``windows`` (n, L)
    (each window predicts its tokens 1..L-1), and with ``reference`` its own NLL and the mean
    KL(reference || model) per predicted token."""
    nll = ref_nll = kl = 0.0
    count = 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch]
        tgt = x[:, 1:].unsqueeze(-1)
        lp = F.log_softmax(logits(model, x)[:, :-1], dim=-1)
        nll -= float(lp.gather(-1, tgt).sum(dtype=torch.float64))
        if reference is not None:
            lr = F.log_softmax(logits(reference, x)[:, :-1], dim=-1)
            if lr.shape != lp.shape:
                raise UsageError(f"the reference's logits have shape {tuple(lr.shape)}, the "
                                 f"model's {tuple(lp.shape)}: not the same vocabulary")
            ref_nll -= float(lr.gather(-1, tgt).sum(dtype=torch.float64))
            kl += float((lr.exp() * (lr - lp)).sum(dtype=torch.float64))
        count += tgt.numel()
    out = {"tokens": count, "nll": nll / count}
    if reference is not None:
        out.update(ref_nll=ref_nll / count, kl=kl / count)
    return out


def _windows(ids: list[int], n: int, seqlen: int, vocab: int) -> torch.Tensor:
    k = min(n, len(ids) // seqlen)
    if k == 0:
        raise UsageError(f"the text has {len(ids)} tokens; one window needs {seqlen} "
                         "(pass more text or a shorter --seqlen)")
    t = torch.tensor(ids[:k * seqlen], dtype=torch.int64).view(k, seqlen)
    if int(t.max()) >= vocab:
        raise UsageError(f"the tokenizer gives token id {int(t.max())}, the model's vocabulary "
                         f"has {vocab} tokens: --tokenizer does not belong to this model")
    return t


def _loss_text(nll: float, byte_level: bool) -> str:
    if byte_level:
        return f"bits/byte  {nll / math.log(2):.4f}"
    return f"perplexity {math.exp(nll):.3f} ({nll:.4f} nats/token)"


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    kind = checkpoint_kind(args.model)
    data_path = Path(args.data) if args.data else shipped_text("test")
    text = read_text(data_path, "--data")
    if args.reference is not None:
        ref_kind = checkpoint_kind(args.reference)
    t0 = time.perf_counter()
    model = load_any(args.model, kind)
    vocab = vocab_size(model)
    ctx = context_length(model)
    seqlen = args.seqlen or min(256, ctx or 256)
    if ctx is not None and seqlen > ctx:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's context length ({ctx})")
    tok = load_tokenizer(args.tokenizer, args.model, vocab)
    byte_level = tok == "bytes"
    reference = None
    if args.reference is not None:
        reference = load_any(args.reference, ref_kind)
        if vocab_size(reference) != vocab:
            raise UsageError(f"--reference has a vocabulary of {vocab_size(reference)} tokens, "
                             f"the model {vocab}: the KL needs the same tokens")
    x = _windows(encode(tok, text), args.windows, seqlen, vocab)
    res = evaluate(model, x, reference, args.batch)
    seconds = time.perf_counter() - t0
    result = {"model": str(args.model), "format": kind, "data": str(data_path),
              "windows": int(x.shape[0]), "seqlen": seqlen, "tokens": res["tokens"],
              "tokenizer": "bytes" if byte_level else "tokenizer.json", "seconds": seconds}
    if byte_level:
        result["bits_per_byte"] = res["nll"] / math.log(2)
    else:
        result["perplexity"] = math.exp(res["nll"])
        result["nll"] = res["nll"]
    if reference is not None:
        result["reference"] = str(args.reference)
        result["kl"] = res["kl"]
        result["reference_" + ("bits_per_byte" if byte_level else "perplexity")] = (
            res["ref_nll"] / math.log(2) if byte_level else math.exp(res["ref_nll"]))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    unit = "bytes" if byte_level else "tokens"
    lines = [f"model      {args.model} ({kind})",
             f"data       {data_path}: {x.shape[0]} windows x {seqlen} {unit}",
             _loss_text(res["nll"], byte_level)]
    if reference is not None:
        lines += [f"reference  {args.reference} ({ref_kind}): "
                  f"{_loss_text(res['ref_nll'], byte_level).replace('  ', ' ')}",
                  f"KL         {res['kl']:.5f} nats/token, KL(reference || model)"]
    lines.append(f"time       {seconds:.1f} s")
    print("\n".join(lines))
    sys.stdout.flush()
    return 0
