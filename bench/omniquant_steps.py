"""qkern's OmniQuant against the authors' code step by step: both train LWC on the
wikitext-bytelm with the same first S calibration windows for one epoch (S AdamW steps per
block), then the learned clip factors ``sigmoid(gamma)``, ``sigmoid(beta)`` of every layer are
compared (qkern: ``OmniQuantQuantizer.clips``; authors: the ``bound_factor`` logits their
``omniquant()`` saves in ``omni_parameters.pth``), with the bits per byte of both models.

    PYTHONPATH=python python bench/omniquant_steps.py [--steps 1,4,16] [--settings 2:64]
        [--aug-loss]

Each line: the block, the layer, max |qkern - authors| over the factors, and how many groups
differ by more than 1e-6 (of all groups). See bench/omniquant.py for how their code runs.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import omniquant as B  # noqa: E402  (the side-by-side bench's glue for the authors' code)

from qkern.models import bits_per_byte, load_llama  # noqa: E402
from qkern.quantization import OmniQuantConfig, quantize_sequential, text_calibration  # noqa: E402
from qkern.quantization.algorithms.omniquant import OmniQuantQuantizer  # noqa: E402

PEER_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def peer_clips(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{qkern layer name: (sigmoid(up), sigmoid(low)) flat} from their omni_parameters.pth."""
    params = torch.load(os.path.join(path, "omni_parameters.pth"))
    out: dict[str, list] = {}
    for i, sd in params.items():
        for k, v in sd.items():
            mod, _, which = k.rpartition(".weight_quantizer.")
            mod = mod.removeprefix("layer.")
            head, _, last = mod.rpartition(".")
            name = f"model.layers.{i}.{head}.{PEER_NAMES.get(last, last)}"
            slot = 0 if which.startswith("up") else 1
            out.setdefault(name, [None, None])[slot] = torch.sigmoid(v.float()).reshape(-1)
    return {k: (u, lo) for k, (u, lo) in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="1,4,16")
    ap.add_argument("--settings", default="2:64")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--aug-loss", action="store_true")
    ap.add_argument("--peer-src", default="/work/refs/omniquant-src")
    ap.add_argument("--peer-pkgs", default="/work/refs/omniquant-pkgs")
    a = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    why = B.peer_available(a.peer_src, a.peer_pkgs)
    if why is not None:
        sys.exit(f"authors' code unavailable: {why}")
    with open(B.VALID, "rb") as f:
        cal_all = text_calibration(f.read(), "bytes", max(int(s) for s in a.steps.split(",")),
                                   256)
    with open(B.TEST, "rb") as f:
        test = f.read()
    model = load_llama(B.MODEL)
    for s in a.settings.split(","):
        bits, g = (int(v) for v in s.split(":"))
        for steps in (int(v) for v in a.steps.split(",")):
            cal = cal_all[:steps]
            q = OmniQuantQuantizer(OmniQuantConfig(bits=bits, group_size=g or None,
                                                   epochs=a.epochs, aug_loss=a.aug_loss))
            mq = quantize_sequential(model, q, copy.copy(cal))
            peer = B.run_peer(bits, g or None, cal, a.epochs, 1e-2,
                              logging.getLogger("peer"), a.aug_loss)
            theirs = peer_clips(peer.omni_dir)
            print(f"w{bits} g{g}  {steps} sample(s) x {a.epochs} epoch(s)  bits/byte qkern "
                  f"{bits_per_byte(mq, test):.4f}  authors "
                  f"{B.hf_bits_per_byte(peer, test):.4f}", flush=True)
            for name, (u, lo) in q.clips.items():
                pu, plo = theirs[name]
                d = torch.maximum((u.reshape(-1) - pu).abs(), (lo.reshape(-1) - plo).abs())
                print(f"  {name:<34} max|d| {float(d.max()):.2e}  groups differing "
                      f"{int((d > 1e-6).sum())}/{d.numel()}", flush=True)


if __name__ == "__main__":
    main()
