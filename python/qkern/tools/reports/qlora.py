"""QLoRA on the shipped byte-level Llama: NF4 (double-quantized) frozen base + LoRA adapters.

``python -m qkern.tools.reports.qlora [--steps 100] [--lr 3e-4] [--quick]`` prints a Markdown
table: models/wikitext-bytelm with every attention and MLP Linear quantized to NF4 (groups of
64, 32 for down_proj whose 672 inputs 64 does not divide; double-quantized scales: the lut4_dq
kernel; embeddings and lm_head stay float, as in QLoRA), LoRA rank 8 on all of those layers,
trained with Adam on random 256-byte windows of the *first half* of WikiText-2 test; bits per
byte on the *second half* for the float model, plain NF4, NF4 + LoRA before and after, and the
two merges (float; re-quantized to NF4). Then the memory: the packed base buffers (checked
bit-identical after training) against float32, the adapters, Adam's state and the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ... import WeightOnlyConfig, quantize_model, set_num_threads
from ...lora import LoRAConfig, apply_lora, merge_lora, save_adapters
from ...models import bits_per_byte, load_llama
from ...models.assets import shipped_path
from ...nn import QuantLinear
from .llm import wikitext_bytes

__all__ = ["NF4_CONFIG", "main", "qlora_table", "split_text", "train"]

#: the base quantization: every block Linear in NF4, double-quantized scales
NF4_CONFIG = WeightOnlyConfig(fmt="nf4", group_size=64, double_quant=True,
                              include=["model.layers.*"],
                              overrides={"*.down_proj": {"group_size": 32}})


def split_text() -> tuple[bytes, bytes]:
    """WikiText-2 test, cut in two halves: (training text, evaluation text)."""
    _, test = wikitext_bytes()
    half = len(test) // 2
    return test[:half], test[half:]


def _windows(ids: torch.Tensor, batch: int, window: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, ids.numel() - window, (batch,), generator=gen)
    return torch.stack([ids[s:s + window] for s in start.tolist()])


def train(model: nn.Module, text: bytes, steps: int, batch: int = 4, window: int = 256,
          lr: float = 3e-4, seed: int = 0) -> tuple[list[float], torch.optim.Optimizer]:
    """Adam on the trainable parameters over random windows of ``text``: next-byte
    cross-entropy in bits. Returns the per-step losses and the optimizer."""
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20))
    model.train()
    losses = []
    for _ in range(steps):
        x = _windows(ids, batch, window, gen)
        logits = model(x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()) / 0.6931471805599453)
    model.eval()
    return losses, opt


def _quant_bytes(model: nn.Module) -> tuple[int, int, dict[str, torch.Tensor]]:
    """(packed bytes, float32 bytes of the same weights, a copy of the packed buffers)."""
    packed, flt, copies = 0, 0, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for b, t in m.packed_buffers().items():
                packed += t.numel() * t.element_size()
                copies[f"{name.removesuffix('.base')}.{b}"] = t.clone()
            flt += 4 * m.in_features * m.out_features
    return packed, flt, copies


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.3f} MiB"


def qlora_table(steps: int = 100, batch: int = 4, lr: float = 3e-4, rank: int = 8,
                alpha: float = 16.0, eval_windows: int = 32, adapters: str | None = None,
                dropout: float = 0.05) -> str:
    t0 = time.perf_counter()
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    train_text, eval_text = split_text()

    def bpb(m: nn.Module) -> str:
        return f"{bits_per_byte(m, eval_text, n_windows=eval_windows):.4f}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_model(model, NF4_CONFIG)
    packed, flt, before = _quant_bytes(q)
    n_layers = sum(isinstance(m, QuantLinear) for m in q.modules())
    lm = apply_lora(q, LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, seed=0))
    rows = [("fp32 (reference)", bpb(model)), ("NF4 double-quant, no adapters", bpb(q)),
            (f"NF4 + LoRA r{rank}, step 0", bpb(lm))]
    t1 = time.perf_counter()
    losses, opt = train(lm, train_text, steps, batch=batch, lr=lr)
    secs = time.perf_counter() - t1
    rows.append((f"NF4 + LoRA r{rank}, after {steps} steps", bpb(lm)))
    rows.append(("merged into fp32 (merge_lora)", bpb(merge_lora(lm))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows.append(("merged, re-quantized to NF4 (merge_lora(requantize=\"nf4\"))",
                     bpb(merge_lora(lm, requantize="nf4"))))
    if adapters:
        save_adapters(lm, adapters, overwrite=True)
    packed_after, _, after = _quant_bytes(lm)
    same = packed_after == packed and all(torch.equal(after[k], v) for k, v in before.items())
    ad = sum(p.numel() * p.element_size() for p in lm.parameters() if p.requires_grad)
    adam = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))
    k = max(1, min(20, len(losses) // 4))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    lines = [
        f"wikitext-bytelm, QLoRA: LoRA r{rank} (alpha {alpha:g}) on all {n_layers} attention + "
        f"MLP layers over NF4 double-quantized weights (dropout {dropout:g}); Adam lr {lr:g} "
        f"(20-step warm-up), "
        f"{steps} steps x {batch} windows x 256 bytes of WikiText-2 test's first half; bits per "
        f"byte on the second half ({eval_windows} x 256 bytes; lower is better)", "",
        "| model | bits per byte |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    if losses:
        lines += ["", f"training loss (bits per byte, mean of {k} steps): first "
                  f"{sum(losses[:k]) / k:.4f}, last {sum(losses[-k:]) / k:.4f}; "
                  f"{secs:.0f} s of training ({secs / steps:.2f} s per step)"]
    lines += [
        "", "| memory | bytes |", "|---|---|",
        f"| the {n_layers} base layers in float32 | {_mib(flt)} |",
        f"| the same, NF4 packed buffers (lut4_dq: codes, int8 scales, scale2, mean, table) | "
        f"{_mib(packed)} ({packed * 8 / (flt / 4):.3f} bits per weight) |",
        f"| the packed buffers after training | {_mib(packed_after)}, "
        f"{'bit-identical' if same else 'CHANGED'} |",
        f"| LoRA adapters (A, B; float32) | {_mib(ad)} |",
        f"| Adam state of the adapters | {_mib(adam)} |",
        f"| whole model state: fp32 / NF4 + LoRA | {_mib(_state_bytes(model))} / "
        f"{_mib(_state_bytes(lm))} |",
        f"| peak RSS of this process (torch included) | {_mib(rss)} |",
        "", f"total {time.perf_counter() - t0:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qkern.tools.reports.qlora",
                                description="QLoRA fine-tuning of the shipped byte-level Llama")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=4, help="256-byte windows per step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--save-adapters", default=None, metavar="PATH",
                   help="write the trained adapters (safetensors) to PATH")
    p.add_argument("--quick", action="store_true", help="10 steps, 4 evaluation windows")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.eval_windows = 10, 4
    if a.steps < 0 or a.batch < 1 or a.eval_windows < 1 or not a.lr > 0:
        p.error("--steps >= 0, --batch >= 1, --eval-windows >= 1 and --lr > 0 please")
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(qlora_table(a.steps, a.batch, a.lr, a.rank, a.alpha, a.eval_windows,
                      a.save_adapters, a.dropout))


if __name__ == "__main__":
    main()
