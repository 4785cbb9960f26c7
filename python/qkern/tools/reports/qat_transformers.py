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
import copy
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import quantization as Q
from ...models import load_pretrained
from ...models.assets import WIKITEXT_BYTELM, WIKITEXT_TEXT, shipped_path
from ...models.bert import embed, load_minilm, load_tokenizer
from ...nn import QuantLinear
from .minilm import sentences

__all__ = ["ABLATION", "BEST", "FFN_OUT", "Recipe", "block_outputs", "bytelm_bpb", "bytelm_rows",
           "calibrated", "distill_loss", "finetune_bytelm", "finetune_minilm", "minilm_rows",
           "minilm_scores", "text_bytes", "w4a8", "windows"]


#: BERT's FFN output projections: their inputs are the GELU outputs, with rare large values
FFN_OUT = "encoder.layer.*.output.dense"


def w4a8(method: str, init: str = "max", group_size: int | None = None,
         token: tuple[str, ...] = ()) -> Q.QATConfig:
    """int4 weights (per output channel, or ``group_size``), int8 activations per tensor (per
    token on the layers matching ``token``), attention Q / K / V / P int8."""
    return Q.QATConfig(weight=4, activation=8, method=method, attention=True, lsq_init=init,
                       group_size=group_size,
                       overrides={p: {"act_granularity": "token"} for p in token})


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


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, sched=None) -> None:
    """One Adam step, the step sizes kept positive (Adam's fixed-size steps can cross 0)."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
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


def calibrated(model: nn.Module, method: str, x, **kw) -> nn.Module:
    q = Q.prepare(model, w4a8(method, **kw))
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


@dataclass(frozen=True)
class Recipe:
    """A MiniLM W4A8 QAT run: ``group_size`` (None: per output channel), ``token``: the
    layers with per-token int8 inputs (``"none"``, ``"ffn"``: the FFN output projections,
    ``"all"``: every Linear; the others per tensor), ``init``: LSQ's step-size init,
    ``layerwise``: add the blocks' hidden-state MSE to the loss, ``gptq``: start from GPTQ's
    int4 weights (same group size, 256 training sentences) instead of the fp32 ones,
    ``cosine``: cosine learning rate decay, ``n_train`` WikiText-2 valid sentences,
    ``steps`` of batch ``batch``."""

    group_size: int | None = None
    token: str = "none"
    init: str = "max"
    layerwise: bool = False
    gptq: bool = False
    cosine: bool = False
    n_train: int = 512
    steps: int = 100
    batch: int = 16
    lr: float = 1e-4

    def config(self) -> Q.QATConfig:
        pats = {"none": (), "ffn": (FFN_OUT,), "all": ("*",)}[self.token]
        return w4a8("lsq", self.init, self.group_size, pats)

    def describe(self) -> str:
        g = "per channel" if self.group_size is None else f"g{self.group_size}"
        act = {"none": "per tensor", "ffn": "per tensor, FFN out per token",
               "all": "per token"}[self.token]
        return (f"{g}, act {act}, {'GPTQ weights, ' if self.gptq else ''}"
                f"init {self.init}, loss {'1 - cos + block MSE' if self.layerwise else '1 - cos'}"
                f", lr {self.lr:g}{' cosine' if self.cosine else ''}, {self.steps} steps x "
                f"{self.batch} of {self.n_train} sentences")


def block_outputs(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    """A list that each forward of ``model`` fills with its encoder blocks' outputs (clear it
    between calls), and the hook handles."""
    out: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, o: out.append(o))
             for blk in model.encoder.layer]
    return out, hooks


def _pool(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def distill_loss(hs: list[torch.Tensor], ht: list[torch.Tensor], m: torch.Tensor
                 ) -> torch.Tensor:
    """Mean over blocks of the student's squared error on the real tokens (mask ``m``),
    relative to the teacher's mean square there."""
    terms = [((s - t).square() * m).sum() / (t.square() * m).sum() for s, t in zip(hs, ht)]
    return torch.stack(terms).mean()


def gptq_weights(model: nn.Module, train: list[str], group_size: int | None, tok,
                 n: int = 256) -> nn.Module:
    """A float copy of ``model`` whose Linear weights are GPTQ's int4 ones (dequantized),
    calibrated on ``train[:n]``."""
    cal = [tok(train[i:i + 32]) for i in range(0, min(n, len(train)), 32)]
    g = Q.quantize_model(model, Q.GPTQConfig(bits=4, group_size=group_size, include=["Linear"]),
                         calibration=cal)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in g.named_modules():
            if isinstance(m, QuantLinear):
                out.get_submodule(name).weight.copy_(m.dequantize_weight())
    return out


def finetune_minilm(model: nn.Module, train: list[str], steps: int = 100, batch: int = 16,
                    lr: float = 1e-4, scale_lr: float = 1e-4, seed: int = 0,
                    recipe: Recipe | None = None) -> nn.Module:
    """A W4A8 LSQ copy of ``model`` trained to match its fp32 sentence embeddings (mean-pooled,
    unit norm; loss ``1 - cosine``, plus with ``recipe.layerwise`` the blocks' relative MSE
    against the fp32 model's) on ``train``. ``recipe`` (None: ``Recipe(steps=steps,
    batch=batch, lr=lr)``) sets the config and the schedule."""
    r = Recipe(steps=steps, batch=batch, lr=lr) if recipe is None else recipe
    tok = load_tokenizer(model.name_or_path)
    gen = torch.Generator().manual_seed(seed)
    q = Q.prepare(gptq_weights(model, train, r.group_size, tok) if r.gptq else model,
                  r.config())
    with torch.no_grad():
        q(**tok(train[:r.batch]))
    q.train()
    opt = _optimizer(q, r.lr, scale_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(r.steps, 1)) if r.cosine \
        else None
    hs, hooks_s = block_outputs(q)
    ht, hooks_t = block_outputs(model)
    try:
        for _ in range(r.steps):
            idx = torch.randint(0, len(train), (r.batch,), generator=gen).tolist()
            enc = tok([train[i] for i in idx])
            m = enc["attention_mask"].unsqueeze(-1).float()
            hs.clear()
            ht.clear()
            with torch.no_grad():
                target = _pool(model(**enc).float(), m)
            e = _pool(q(**enc).float(), m)
            loss = (1 - (e * target).sum(-1)).mean()
            if r.layerwise:
                loss = loss + distill_loss(hs, ht, m)
            _step(opt, loss, sched)
    finally:
        for h in hooks_s + hooks_t:
            h.remove()
    return q.eval()


def minilm_scores(q: nn.Module, test: list[str], ref: torch.Tensor, tok) -> tuple[float, float]:
    """(mean, worst) cosine of ``q``'s embeddings of ``test`` to ``ref``."""
    with torch.no_grad():
        cos = (embed(q, test, tok) * ref).sum(-1)
    return float(cos.mean()), float(cos.min())


#: the ablation: each row adds one change to the one above
ABLATION: list[tuple[str, Recipe]] = [
    ("per channel, act per tensor, 1 - cos (the first table)", Recipe()),
    ("+ g64 weights", Recipe(group_size=64)),
    ("+ every Linear's input per-token int8", Recipe(group_size=64, token="all")),
    ("+ lsq_init='mse'", Recipe(group_size=64, token="all", init="mse")),
    ("+ block MSE distillation", Recipe(group_size=64, token="all", init="mse",
                                        layerwise=True)),
    ("+ GPTQ g64 start (init max), cosine lr, 2048 sentences",
     Recipe(group_size=64, token="all", layerwise=True, gptq=True, cosine=True, n_train=2048)),
]


#: the best W4A8 recipe measured (docs/qat.md: cosine 0.9901, about 14 minutes on one core)
BEST = Recipe(group_size=32, token="all", layerwise=True, gptq=True, cosine=True, n_train=2048,
              steps=800)


def minilm_rows(steps: int = 100, n_test: int = 128, n_train: int = 512,
                ablation: bool = False, best: bool = False) -> list[tuple[str, float, float]]:
    """(row, mean cosine, worst cosine) to the fp32 embeddings on ``n_test`` test sentences:
    RTN, LSQ init, LSQ after ``steps``; with ``ablation`` the :data:`ABLATION` rows (each
    followed by its seconds), with ``best`` the :data:`BEST` recipe instead."""
    model = load_minilm()
    tok = load_tokenizer(model.name_or_path)
    test, train = sentences(n_test, "test"), sentences(n_train, "valid")
    with torch.no_grad():
        ref = embed(model, test, tok)
    calib = tok(train[:16])
    rows = [("RTN W4A8 (no training)", *minilm_scores(calibrated(model, "ste", calib), test,
                                                     ref, tok))]
    rows.append(("LSQ W4A8 init", *minilm_scores(calibrated(model, "lsq", calib), test, ref,
                                                 tok)))
    if best:
        q = finetune_minilm(model, sentences(BEST.n_train, "valid"), recipe=BEST)
        return rows + [(f"LSQ W4A8 QAT ({BEST.describe()})", *minilm_scores(q, test, ref, tok))]
    if not ablation:
        q = finetune_minilm(model, train, steps)
        return rows + [(f"LSQ W4A8 QAT, {steps} steps", *minilm_scores(q, test, ref, tok))]
    for name, r in ABLATION:
        t = time.time()
        q = finetune_minilm(model, sentences(r.n_train, "valid"), recipe=r)
        rows.append((f"{name} ({r.describe()}; {time.time() - t:.0f} s)",
                     *minilm_scores(q, test, ref, tok)))
        print(f"| {rows[-1][0]} | {rows[-1][1]:.4f} | {rows[-1][2]:.4f} |", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkern.tools.reports.qat_transformers")
    ap.add_argument("--which", nargs="+", choices=("bytelm", "minilm"),
                    default=["bytelm", "minilm"])
    ap.add_argument("--steps", type=int, default=100, help="bytelm fine-tune steps")
    ap.add_argument("--minilm-steps", type=int, default=100)
    ap.add_argument("--ablation", action="store_true",
                    help="minilm: the recipe ablation (ABLATION) instead of one run")
    ap.add_argument("--best", action="store_true",
                    help="minilm: the best recipe (BEST: g32, 700 steps) instead of one run")
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
        rows = minilm_rows(a.minilm_steps, ablation=a.ablation, best=a.best)
        print(f"minilm done in {time.time() - t:.0f} s", file=sys.stderr)
        print("| all-MiniLM-L6-v2 | cosine to fp32 (mean) | worst |\n|---|---|---|")
        for name, mean, worst in rows:
            print(f"| {name} | {mean:.5f} | {worst:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
