"""SmoothQuant W8A8 (qkern.SmoothQuantConfig) beside plain W8A8 and beside the authors' code.

1. wikitext-bytelm, bits per byte on WikiText-2 test (48 windows x 256 bytes), calibration
   64 x 256 bytes of WikiText-2 valid: fp32; plain W8A8 (pairs="none") and SmoothQuant
   (alpha 0.5) at O1 (per-token dynamic activations), O2 (per-tensor dynamic), O3 (per-tensor
   static); all on qkern's int8 x int8 kernels.
2. The reference (github:mit-han-lab/smoothquant, smoothquant/smooth.py + fake_quant.py, loaded
   at run time from the `fetch` mirror, never copied here): its smooth_lm on the transformers
   LlamaForCausalLM loaded from models/wikitext-bytelm, with activation scales computed as its
   calibration.get_act_scales does (per-channel max |x| of every Linear input) on the same 64
   calibration windows; then its fake-quant W8A8 (per-channel weights, per-token or per-tensor
   dynamic activations), and the same smoothed model on qkern's W8A8 kernels.
3. all-MiniLM-L6-v2 (if its weights are installed): sentence-embedding cosine to fp32 on
   WikiText-2 test sentences, plain W8A8 vs SmoothQuant O1/O2/O3 (calibration: 64 valid
   sentences).

Run: PYTHONPATH=python python bench/smoothquant_llm.py [--n-calib 64] [--no-minilm]
     [--no-reference] [--threads 1] [--mirror /work/.mirror/mit-han-lab+smoothquant/repo]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

import qkern
from qkern.models import bits_per_byte, load_llama
from qkern.models.assets import WIKITEXT_BYTELM, WIKITEXT_TEXT, shipped_path
from qkern.quantization import SmoothQuantConfig, text_calibration

MIRROR = "/work/.mirror/mit-han-lab+smoothquant/repo"
LEVELS = ("O1", "O2", "O3")


def quantize(model, cfg, cal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qkern.quantize_model(model, cfg, cal)


def row(name: str, bpb: float, fp: float, secs: float | None = None) -> str:
    t = "" if secs is None else f"{secs:.0f}"
    return f"| {name} | {bpb:.5f} | {100 * (bpb / fp - 1):+.3f} % | {t} |"


def bytelm_table(model, cal, test: bytes, fp: float) -> list[str]:
    out = []
    for lvl in LEVELS:
        for label, pairs in (("plain W8A8", "none"), ("SmoothQuant", "all")):
            t0 = time.perf_counter()
            q = quantize(model, SmoothQuantConfig(alpha=0.5, act=lvl, pairs=pairs), cal)
            secs = time.perf_counter() - t0
            out.append(row(f"qkern {label} {lvl}", bits_per_byte(q, test), fp, secs))
            print(out[-1], flush=True)
    return out


# ---- the reference ---------------------------------------------------------------------------


class Logits(nn.Module):
    """A transformers causal LM as bits_per_byte wants it: forward(ids) -> logits."""

    def __init__(self, hf):
        super().__init__()
        self.hf, self.config = hf, hf.config

    def forward(self, ids):
        return self.hf(ids, use_cache=False).logits


def load_reference(mirror: str):
    """smoothquant.smooth / fake_quant from the mirror (extracted to a temp dir at run time)."""
    if not os.path.isdir(mirror):
        return None, f"reference mirror {mirror} absent (fetch github:mit-han-lab/smoothquant)"
    d = tempfile.mkdtemp(prefix="smoothquant_ref_")
    arch = subprocess.run(["git", f"--git-dir={mirror}", "archive", "HEAD", "smoothquant"],
                          capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=arch, check=True)
    sys.path.insert(0, d)
    try:
        return (importlib.import_module("smoothquant.smooth"),
                importlib.import_module("smoothquant.fake_quant")), ""
    except Exception as e:  # noqa: BLE001 - report why the reference cannot run here
        return None, f"reference code does not import here: {type(e).__name__}: {e}"


def act_scales(model: nn.Module, cal) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of every Linear's input (what the reference's get_act_scales
    computes), on our calibration windows."""
    scales: dict[str, torch.Tensor] = {}
    hs = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(mod, args, n=n):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
                scales[n] = x if n not in scales else torch.maximum(scales[n], x)
            hs.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in cal:
            model(ids, use_cache=False)
    for h in hs:
        h.remove()
    return scales


def reference_table(cal, test: bytes, fp_qkern: float, mirror: str) -> list[str]:
    ref, why = load_reference(mirror)
    if ref is None:
        return [f"(reference skipped: {why})"]
    smooth, fake = ref
    from transformers import LlamaForCausalLM

    path = str(shipped_path(WIKITEXT_BYTELM))
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fp = bits_per_byte(Logits(hf), test)
    out = [row("transformers fp32 (reference model)", fp, fp_qkern)]
    smooth.smooth_lm(hf, act_scales(hf, cal), 0.5)
    out.append(row("reference smooth_lm alone (fp32)", bits_per_byte(Logits(hf), test),
                   fp_qkern))
    print("\n".join(out), flush=True)
    import copy

    for lvl, act in (("O1", "per_token"), ("O2", "per_tensor")):
        m = fake.quantize_llama_like(copy.deepcopy(hf), weight_quant="per_channel",
                                     act_quant=act)
        out.append(row(f"reference smooth_lm + its fake-quant W8A8 {lvl}",
                       bits_per_byte(Logits(m), test), fp_qkern))
        print(out[-1], flush=True)
    for lvl in LEVELS:
        q = quantize(hf, SmoothQuantConfig(act=lvl, pairs="none"), cal)
        out.append(row(f"reference smooth_lm + qkern W8A8 kernels {lvl}",
                       bits_per_byte(Logits(q), test), fp_qkern))
        print(out[-1], flush=True)
    q = quantize(LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                 SmoothQuantConfig(act="O1", pairs="norms"), cal)
    out.append(row("qkern SmoothQuant O1, pairs='norms' (the reference's pairs) on the "
                   "transformers model", bits_per_byte(Logits(q), test), fp_qkern))
    print(out[-1], flush=True)
    return out


# ---- MiniLM ----------------------------------------------------------------------------------


def minilm_table(n_sent: int, n_calib: int) -> list[str]:
    from qkern.models import assets

    try:
        assets.minilm_path()
        import tokenizers  # noqa: F401
    except Exception as e:  # noqa: BLE001 - weights or tokenizer absent
        return [f"(MiniLM skipped: {e}; {assets.MINILM_PIP})"]
    from qkern.models.bert import embed, load_minilm
    from qkern.tools.reports.minilm import calibration, sentences

    model = load_minilm()
    sents = sentences(n_sent)
    cal = calibration(n_calib)
    ref = embed(model, sents)
    out = ["| scheme | mean cosine vs fp32 | min cosine |", "|---|---|---|"]
    for lvl in LEVELS:
        for label, pairs in (("plain W8A8", "none"), ("SmoothQuant", "all")):
            q = quantize(model, SmoothQuantConfig(act=lvl, pairs=pairs), cal)
            cos = (embed(q, sents) * ref).sum(-1)
            out.append(f"| {label} {lvl} | {float(cos.mean()):.5f} | {float(cos.min()):.5f} |")
            print(out[-1], flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--no-bytelm", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--mirror", default=MIRROR)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="qkern and torch threads (1 is much faster on an oversubscribed box)")
    a = ap.parse_args(argv)
    if a.threads:
        qkern.set_num_threads(a.threads)
        torch.set_num_threads(a.threads)
    valid = shipped_path(WIKITEXT_TEXT.format(split="valid")).read_bytes()
    test = shipped_path(WIKITEXT_TEXT.format(split="test")).read_bytes()
    cal = text_calibration(valid, "bytes", a.n_calib, 256)
    lines = []
    fp = None
    if not a.no_bytelm or not a.no_reference:
        model = load_llama(shipped_path(WIKITEXT_BYTELM))
        fp = bits_per_byte(model, test)
        lines = ["| wikitext-bytelm | bits/byte (WikiText-2 test) | vs fp32 | quantize s |",
                 "|---|---|---|---|", row("fp32", fp, fp)]
        print("\n".join(lines), flush=True)
        if not a.no_bytelm:
            lines += bytelm_table(model, cal, test, fp)
    if not a.no_reference:
        lines += reference_table(cal, test, fp, a.mirror)
    if not a.no_minilm:
        lines += ["", "all-MiniLM-L6-v2 sentence embeddings (WikiText-2 test sentences)"]
        lines += minilm_table(a.sentences, a.n_calib)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
