"""QAT of transformers at W4A8 (int4 weights per output channel, int8 activations per tensor,
the attention matmuls' Q, K, V and softmax probabilities int8 too; norms and embeddings float).

- ``bytelm``: the wikitext-bytelm (a transformers ``LlamaForCausalLM``), bits per byte on 48
  windows of 256 bytes of WikiText-2 *test*: fp32, RTN W4A8 (``method="ste"``: max-abs weight
  scales per channel = round-to-nearest, activation ranges from one calibration batch, no
  training), LSQ W4A8 at initialisation, and LSQ W4A8 after a short fine-tune on WikiText-2
  *valid* (next-byte cross-entropy, Adam, random 256-byte windows).
- ``minilm``: all-MiniLM-L6-v2 (qkern.models.bert), LSQ W4A8 trained to match the fp32
  sentence embeddings (loss ``1 - cos``) on WikiText-2 *valid* sentences, scored by embedding
  cosine on *test* sentences, beside RTN W4A8 (``"ste"``, untrained).

``python -m qkern.tools.reports.qat_transformers [--steps 100] [--which bytelm minilm]``."""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from ... import quantization as Q
from ...models import load_pretrained
from ...models.assets import WIKITEXT_BYTELM, WIKITEXT_TEXT, shipped_path
from ...models.bert import embed, load_minilm, load_tokenizer
from .minilm import sentences

__all__ = ["bytelm_bpb", "bytelm_rows", "calibrated", "finetune_bytelm", "finetune_minilm",
           "minilm_rows", "text_bytes", "w4a8", "windows"]


def w4a8(method: str, init: str = "max") -> Q.QATConfig:
    return Q.QATConfig(weight=4, activation=8, method=method, attention=True, lsq_init=init)


def text_bytes(split: str) -> bytes:
    return shipped_path(WIKITEXT_TEXT.format(split=split)).read_bytes()


def bytelm_bpb(model: nn.Module, data: bytes, window: int = 256, n_windows: int = 48,
               batch: int = 16) -> float:
    """Bits per byte of a transformers byte-level causal LM (logits from ``.logits``) over the
    first ``n_windows`` non-overlapping windows (as :func:`qkern.models.bits_per_byte`)."""
    n = min(n_windows, len(data) // window)
    ids = torch.frombuffer(bytearray(data[:n * window]), dtype=torch.uint8).long().view(n, window)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, batch):
            x = ids[i:i + batch]
            logits = model(x).logits.float()
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           x[:, 1:].reshape(-1), reduction="sum"))
    return total / (n * (window - 1)) / math.log(2)


def windows(data: bytes, n: int, window: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - window, (n,), generator=gen).tolist()
    return torch.stack([torch.frombuffer(bytearray(data[s:s + window]), dtype=torch.uint8)
                        for s in starts]).long()


def _optimizer(model: nn.Module, lr: float, scale_lr: float) -> torch.optim.Optimizer:
    """Adam, the step sizes in their own group at ``scale_lr``."""
    scales = [p for n, p in model.named_parameters() if n.endswith(".scale")]
    ids = {id(p) for p in scales}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    return torch.optim.Adam([{"params": rest, "lr": lr}, {"params": scales, "lr": scale_lr}])


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One Adam step, the step sizes kept positive (Adam's fixed-size steps can cross 0)."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for p in opt.param_groups[1]["params"]:
            p.clamp_(min=1e-8)


def finetune_bytelm(model: nn.Module, steps: int = 100, batch: int = 8, window: int = 256,
                    lr: float = 2e-5, scale_lr: float = 1e-4, seed: int = 0) -> nn.Module:
    """Prepares a W4A8 LSQ copy of ``model`` and trains it ``steps`` steps on WikiText-2
    valid (next-byte cross-entropy); returns it in eval mode."""
    data, gen = text_bytes("valid"), torch.Generator().manual_seed(seed)
    q = Q.prepare(model, w4a8("lsq"))
    with torch.no_grad():  # the first batch sets the activation step sizes
        q(windows(data, batch, window, gen))
    q.train()
    opt = _optimizer(q, lr, scale_lr)
    for _ in range(steps):
        x = windows(data, batch, window, gen)
        logits = q(x).logits
        _step(opt, F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   x[:, 1:].reshape(-1)))
    return q.eval()


def calibrated(model: nn.Module, method: str, x) -> nn.Module:
    q = Q.prepare(model, w4a8(method))
    with torch.no_grad():
        q(**x) if isinstance(x, dict) else q(x)
    return q.eval()


def bytelm_rows(steps: int = 100, n_windows: int = 48) -> list[tuple[str, float]]:
    """(row, bits per byte) for fp32, RTN W4A8, LSQ W4A8 init, LSQ W4A8 after ``steps``."""
    model = load_pretrained(shipped_path(WIKITEXT_BYTELM))
    test = text_bytes("test")
    calib = windows(text_bytes("valid"), 8, 256, torch.Generator().manual_seed(0))
    rows = [("fp32", bytelm_bpb(model, test, n_windows=n_windows))]
    for name, method in (("RTN W4A8 (no training)", "ste"), ("LSQ W4A8 init", "lsq")):
        rows.append((name, bytelm_bpb(calibrated(model, method, calib), test,
                                      n_windows=n_windows)))
    q = finetune_bytelm(model, steps)
    rows.append((f"LSQ W4A8 QAT, {steps} steps", bytelm_bpb(q, test, n_windows=n_windows)))
    return rows


def finetune_minilm(model: nn.Module, train: list[str], steps: int = 100, batch: int = 16,
                    lr: float = 1e-4, scale_lr: float = 1e-4, seed: int = 0) -> nn.Module:
    """A W4A8 LSQ copy of ``model`` trained to match its fp32 sentence embeddings (mean-pooled,
    unit norm; loss ``1 - cosine``) on ``train``."""
    tok = load_tokenizer(model.name_or_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        target = embed(model, train, tok).clone()  # a normal tensor (embed: inference mode)
    q = Q.prepare(model, w4a8("lsq"))
    with torch.no_grad():
        q(**tok(train[:batch]))
    q.train()
    opt = _optimizer(q, lr, scale_lr)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=gen).tolist()
        enc = tok([train[i] for i in idx])
        h = q(**enc)
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        _step(opt, (1 - (e * target[idx]).sum(-1)).mean())
    return q.eval()


def minilm_rows(steps: int = 100, n_test: int = 128, n_train: int = 512
                ) -> list[tuple[str, float, float]]:
    """(row, mean cosine, worst cosine) to the fp32 embeddings on ``n_test`` test sentences."""
    model = load_minilm()
    tok = load_tokenizer(model.name_or_path)
    test, train = sentences(n_test, "test"), sentences(n_train, "valid")
    with torch.no_grad():
        ref = embed(model, test, tok)

    def score(m):
        with torch.no_grad():
            cos = (embed(m, test, tok) * ref).sum(-1)
        return float(cos.mean()), float(cos.min())

    rows = [("RTN W4A8 (no training)", *score(calibrated(model, "ste", tok(train[:16]))))]
    rows.append(("LSQ W4A8 init", *score(calibrated(model, "lsq", tok(train[:16])))))
    q = finetune_minilm(model, train, steps)
    rows.append((f"LSQ W4A8 QAT, {steps} steps", *score(q)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkern.tools.reports.qat_transformers")
    ap.add_argument("--which", nargs="+", choices=("bytelm", "minilm"),
                    default=["bytelm", "minilm"])
    ap.add_argument("--steps", type=int, default=100, help="bytelm fine-tune steps")
    ap.add_argument("--minilm-steps", type=int, default=100)
    a = ap.parse_args(argv)
    if a.steps < 0 or a.minilm_steps < 0:
        ap.error("steps must be >= 0")
    torch.manual_seed(0)
    if "bytelm" in a.which:
        t = time.time()
        rows = bytelm_rows(a.steps)
        print(f"bytelm done in {time.time() - t:.0f} s", file=sys.stderr)
        print("| wikitext-bytelm | bits per byte (test, 48 x 256) |\n|---|---|")
        for name, bpb in rows:
            print(f"| {name} | {bpb:.4f} |")
        gap = rows[1][1] - rows[0][1]
        print(f"\nRTN gap recovered by QAT: {(rows[1][1] - rows[-1][1]) / gap:.0%}\n")
    if "minilm" in a.which:
        t = time.time()
        rows = minilm_rows(a.minilm_steps)
        print(f"minilm done in {time.time() - t:.0f} s", file=sys.stderr)
        print("| all-MiniLM-L6-v2 | cosine to fp32 (mean) | worst |\n|---|---|---|")
        for name, mean, worst in rows:
            print(f"| {name} | {mean:.4f} | {worst:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
