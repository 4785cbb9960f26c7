"""OmniQuant on the wikitext-bytelm: bits per byte on WikiText-2 test (48 windows of 256
bytes; calibration N x 256 bytes of WikiText-2 valid) for fp32, RTN (asymmetric, same
bits / groups), qkern's OmniQuant (LWC), GPTQ where qkern has it, and the authors' OmniQuant
(OpenGVLab/OmniQuant, run on the CPU from a checkout of their repository, never committed)
on the same model and calibration data, with times.

    PYTHONPATH=python python bench/omniquant.py [--epochs 20] [--nsamples 64] \
        [--settings 4:128,3:128,2:64] [--peer-src /work/refs/omniquant-src]

The authors' code is loaded from ``--peer-src`` (a checkout of OpenGVLab/OmniQuant holding
``quantize/`` and ``utils.py``; its ``utils`` needs ``termcolor``: ``--peer-pkgs`` is put on
sys.path for it). It is skipped with a message when it cannot run. How it runs here (glue
only, their algorithm untouched): their Mixtral path (each ``nn.Linear`` of a decoder layer
wrapped in their ``QuantLinear``), since their Llama layer class targets transformers 4.3x;
that path skips modules named ``gate``, so the MLP's ``gate_proj`` is renamed ``w1``; the
decoder layer is called their way (``layer(x, attention_mask=, position_ids=)[0]``) by a
wrapper computing transformers 5's rotary embeddings; fp32 throughout (``deactive_amp``; their
final ``.half()`` is a no-op on the CPU); a layer whose input size the group does not divide
(down_proj, 672) is quantized per output channel, as qkern does (their asymmetric code asserts
on it); their QuantLinear holds its weight as a plain tensor (as their fp16 -> fp32
``.float()`` leaves it on a GPU); ``torch.cuda.max_memory_allocated`` in their log line
returns 0 on a CPU-only torch.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

import qkern
from qkern.models import bits_per_byte, load_llama
from qkern.models.assets import shipped_path
from qkern.quantization import (
    OmniQuantConfig,
    RTNConfig,
    quantize_sequential,
    rotate_model,
    text_calibration,
)
from qkern.quantization.algorithms.omniquant import OmniQuantQuantizer

MODEL = shipped_path("models/wikitext-bytelm")
VALID = shipped_path("data/wikitext-2/wiki.valid.tokens")
TEST = shipped_path("data/wikitext-2/wiki.test.tokens")


def hf_bits_per_byte(model: nn.Module, data: bytes, window: int = 256, n_windows: int = 48,
                     batch: int = 16) -> float:
    """qkern.models.bits_per_byte for a transformers causal LM (same windows, same sum)."""
    n = min(n_windows, len(data) // window)
    ids = torch.frombuffer(bytearray(data[:n * window]), dtype=torch.uint8).long().view(n, window)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch):
            x = ids[i:i + batch]
            logits = model(x).logits.float()
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    return total / count / math.log(2)


# ---- the authors' code, run on the CPU ---------------------------------------------------------


class PeerMLP(nn.Module):
    """Llama's MLP with its linears renamed (their Mixtral path skips names holding 'gate')."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.w1, self.w3, self.w2, self.act_fn = (mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                                                  mlp.act_fn)

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class PeerLayer(nn.Module):
    """A transformers Llama decoder layer called the way OmniQuant calls layers."""

    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        layer.mlp = PeerMLP(layer.mlp)
        self.layer, self.rotary, self.tuple_out = layer, [rotary], True

    def forward(self, x, attention_mask=None, position_ids=None, position_embeddings=None,
                **kw):
        if position_ids is None:
            position_ids = torch.arange(x.shape[1]).unsqueeze(0)
        if position_embeddings is None:
            position_embeddings = self.rotary[0](x, position_ids)
        out = self.layer(x, attention_mask=attention_mask, position_ids=position_ids,
                         position_embeddings=position_embeddings)
        return (out,) if self.tuple_out else out

    def half(self):  # fp32 on the CPU
        return self


def peer_available(src: str, pkgs: str) -> str | None:
    """None when the authors' code imports, else why not."""
    if not os.path.isfile(os.path.join(src, "quantize", "omniquant.py")):
        return (f"no OmniQuant checkout at {src} (fetch github:OpenGVLab/OmniQuant and "
                "extract quantize/, models/, utils.py there)")
    for p in (pkgs, src):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        import quantize.omniquant  # noqa: F401
    except Exception as e:  # their import chain: transformers internals, termcolor ...
        return f"the authors' code does not import here: {type(e).__name__}: {e}"
    return None


def run_peer(bits: int, group: int | None, cal: list, epochs: int, lr_lwc: float,
             log: logging.Logger, aug_loss: bool = False) -> nn.Module:
    """The authors' ``omniquant()`` on transformers' copy of the bytelm (LWC, weight-only,
    batch 1, AdamW, wd 0; ``aug_loss`` their ``--aug_loss`` of the W2A16 scripts); the model
    comes back with ``omni_dir``, where their ``omni_parameters.pth`` (the learned
    ``bound_factor`` logits per layer) was saved."""
    import quantize.int_linear as il
    import quantize.omniquant as oq
    from transformers import LlamaForCausalLM

    base = il.UniformAffineQuantizer

    def quantizer(**kw):  # per output channel where the group does not divide K (as qkern)
        g, shape = kw.get("group_size"), kw.get("shape")
        if g and shape is not None and shape[-1] % g:
            kw["group_size"] = None
        return base(**kw)

    class PlainQuantLinear(il.QuantLinear):
        """Their QuantLinear with weight / bias buffers as plain tensors (what their
        ``qlayer.float()`` makes of the fp16 weights on a GPU; in fp32 the Parameters
        stayed, and their ``temp_weight = weight_quantizer(temp_weight)`` raised)."""

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.weight = self.weight.detach()
            if self.bias is not None:
                self.bias = self.bias.detach()

    il.UniformAffineQuantizer = quantizer
    oq.QuantLinear = PlainQuantLinear
    if not torch.cuda.is_available():
        torch.cuda.max_memory_allocated = lambda *a, **k: 0
    model = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad = False
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = PeerLayer(layers[i], model.model.rotary_emb)
    args = types.SimpleNamespace(
        net="mixtral-bytelm", deactive_amp=True, epochs=epochs, nsamples=len(cal),
        batch_size=1, aug_loss=aug_loss, resume=None, let=False, lwc=True, let_lr=5e-3,
        lwc_lr=lr_lwc, wd=0.0, real_quant=False, alpha=0.5, wbits=bits, abits=16,
        output_dir=tempfile.mkdtemp(prefix="omniquant-peer-"),
        weight_quant_params={"n_bits": bits, "per_channel_axes": [0], "symmetric": False,
                             "dynamic_method": "per_channel", "group_size": group,
                             "lwc": True, "disable_zero_point": False},
        act_quant_params={"n_bits": 16, "per_channel_axes": [], "symmetric": False,
                          "dynamic_method": "per_token"})
    lm = types.SimpleNamespace(model=model, device="cpu", _device="cpu",
                               seqlen=cal[0].shape[1])
    try:
        oq.omniquant(lm, args, [(ids, None) for ids in cal], None, None, log)
    finally:
        il.UniformAffineQuantizer = base
        oq.QuantLinear = il.QuantLinear
    for lay in model.model.layers:
        lay.tuple_out = False
    model.omni_dir = args.output_dir
    return model


# ---- the bench -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="4:128,3:128,2:64",
                    help="bits:group pairs (group 0 = per output channel)")
    ap.add_argument("--epochs", type=int, default=20, help="paper: 20 (40 at W2A16)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--lr-lwc", type=float, default=1e-2)
    ap.add_argument("--aug-loss", action="store_true",
                    help="the authors' --aug_loss (their W2A16 scripts: 40 epochs + aug_loss)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (training is many small ops: 1 is fastest on 2 cores)")
    ap.add_argument("--peer-src", default="/work/refs/omniquant-src")
    ap.add_argument("--peer-pkgs", default="/work/refs/omniquant-pkgs")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--methods", default="rtn,gptq,omni,peer",
                    help="rows to run: rtn, gptq, omni, hf (qkern's OmniQuant on the "
                         "transformers model the authors' code gets), omni+gptq (qkern's "
                         "OmniQuant with then=GPTQConfig: GPTQ inside the learned clip), "
                         "rot+gptq, rot+omni+gptq (the same on QuaRot's rotated model: "
                         "rotate_model(seed=0)), peer")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    peer_log = logging.getLogger("omniquant-peer")
    with open(VALID, "rb") as f:
        cal = text_calibration(f.read(), "bytes", a.nsamples, 256)
    with open(TEST, "rb") as f:
        test = f.read()
    model = load_llama(MODEL)
    todo = set(a.methods.split(","))
    why = ("not asked for" if a.no_peer or "peer" not in todo
           else peer_available(a.peer_src, a.peer_pkgs))
    print(f"wikitext-bytelm, WikiText-2 test bits/byte (48 x 256), calibration {a.nsamples} x "
          f"256, epochs {a.epochs}, lr_lwc {a.lr_lwc}, aug_loss {a.aug_loss}, "
          f"{a.threads} thread(s)")
    print(f"fp32 (qkern) {bits_per_byte(model, test):.4f}")
    if why is None:
        from transformers import LlamaForCausalLM
        hf = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
        print(f"fp32 (transformers) {hf_bits_per_byte(hf, test):.4f}")
    else:
        print(f"authors' OmniQuant skipped: {why}")
    gptq = getattr(qkern.quantization, "GPTQConfig", None)
    print(f"{'setting':<10} {'method':<22} {'bits/byte':>9} {'seconds':>8}", flush=True)
    for s in a.settings.split(","):
        bits, g = (int(v) for v in s.split(":"))
        group = g or None
        tag = f"w{bits} " + (f"g{g}" if g else "pc")

        def row(name, fn, evaluate=bits_per_byte, tag=tag):
            t0 = time.perf_counter()
            q = fn()
            secs = time.perf_counter() - t0
            print(f"{tag:<10} {name:<22} {evaluate(q, test):9.4f} {secs:8.1f}", flush=True)

        if "rtn" in todo:
            row("RTN (asym)", lambda: qkern.quantize_model(
                model, RTNConfig(bits=bits, group_size=group, sym=False), cal))
        if gptq is not None and "gptq" in todo:
            row("GPTQ (qkern)", lambda: qkern.quantize_model(
                model, gptq(bits=bits, group_size=group, sym=False), cal))
        cfg = OmniQuantConfig(bits=bits, group_size=group, epochs=a.epochs, lr_lwc=a.lr_lwc,
                              aug_loss=a.aug_loss)
        if "omni" in todo:
            row("OmniQuant (qkern)",
                lambda: quantize_sequential(model, OmniQuantQuantizer(cfg), copy.copy(cal)))
        if "omni+gptq" in todo and gptq is not None:
            both = OmniQuantConfig(bits=bits, group_size=group, epochs=a.epochs,
                                   lr_lwc=a.lr_lwc, aug_loss=a.aug_loss,
                                   then=gptq(bits=bits, group_size=group, sym=False))
            row("OmniQuant+GPTQ (qkern)",
                lambda: quantize_sequential(model, OmniQuantQuantizer(both), copy.copy(cal)))
        rot_rows = [m for m in ("rot+gptq", "rot+omni+gptq") if m in todo]
        if rot_rows and gptq is not None:
            rot = rotate_model(copy.deepcopy(model), seed=0)
            g = gptq(bits=bits, group_size=group, sym=False)
            if "rot+gptq" in todo:
                row("rotation + GPTQ", lambda: qkern.quantize_model(rot, g, cal))
            if "rot+omni+gptq" in todo:
                ro = OmniQuantConfig(bits=bits, group_size=group, epochs=a.epochs,
                                     lr_lwc=a.lr_lwc, aug_loss=a.aug_loss, then=g)
                row("rotation+Omni+GPTQ", lambda: qkern.quantize_model(rot, ro, cal))
        if "hf" in todo:
            from transformers import LlamaForCausalLM
            hfm = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
            row("OmniQuant (qkern, hf)", lambda: quantize_sequential(
                hfm, OmniQuantQuantizer(cfg), copy.copy(cal)), hf_bits_per_byte)
        if why is None:
            row("OmniQuant (authors)", lambda: run_peer(bits, group, cal, a.epochs, a.lr_lwc,
                                                        peer_log, a.aug_loss), hf_bits_per_byte)


if __name__ == "__main__":
    main()
