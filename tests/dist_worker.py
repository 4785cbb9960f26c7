"""One rank (or the single process) of tests/test_distributed.py: quantizes the tiny Llama of
llm_models with each method asked for and writes {layer: (codes, scale, dequantized weight)}
and the model's logits to OUT/<method>_<batches>_rank<r>.pt. Environment: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT (torchrun's), or none for the single-process reference."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import llm_models as LM
import qkern
from qkern.nn import QuantLinear
from qkern.observers import MinMaxObserver
from qkern.quantization import (
    AWQConfig,
    GPTQConfig,
    RTNConfig,
    SmoothQuantConfig,
    VQConfig,
    ZeroQuantConfig,
    quantize_sequential,
    quantizer_for,
)
from qkern.quantization import distributed as D
from qkern.vq.linear import VQLinear

CONFIGS = {
    "gptq": lambda: GPTQConfig(bits=4, group_size=32),
    "gptq-lp": lambda: GPTQConfig(bits=3, group_size=None, act_order=True),
    "rtn": lambda: RTNConfig(bits=4, group_size=32),
    "smoothquant": lambda: SmoothQuantConfig(act="static_tensor"),
    "smoothquant-gptq": lambda: SmoothQuantConfig(then=GPTQConfig(bits=8, group_size=None)),
    # LKD: one batch a step, its gradient from the rank holding it (exact)
    "zeroquant-lkd": lambda: ZeroQuantConfig(bits=4, group_size=32, lkd=True, lkd_steps=6,
                                             lkd_lr=3e-5),
    "vq": lambda: VQConfig(bits=2, dim=2, kmeans_iters=5),
    # on the shipped byte-level Llama (tests/test_distributed_awq.py): llm-awq's defaults
    # (module objective, float inputs, clip on a token stride that crosses the batches)
    "awq": lambda: AWQConfig(bits=4, group_size=32, n_grid=10, clip_tokens=24),
    # the block objective on the quantized prefix, AutoAWQ's duo scaling, handed to GPTQ
    "awq-gptq": lambda: AWQConfig(bits=3, group_size=32, sym=True, n_grid=10, objective="block",
                                  duo_scaling=True, inputs="quantized", clip_tokens=None,
                                  then=GPTQConfig(bits=3, group_size=32, sym=True)),
}
#: the methods run on the shipped byte-level Llama (seqlen 32) instead of llm_models' Llama
BYTELM = ("awq", "awq-gptq")
#: what the quantizer chose, saved with the layers: AWQ's, and other methods' named here
AWQ_CHOICES = ("alphas", "losses", "scales", "clips")
CHOICES = {"zeroquant-lkd": ("lkd_losses",)}


def layers(model) -> dict:
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            q = m.quantized_weight()
            out[n] = {"codes": q.codes.clone(), "scale": q.scale.clone(),
                      "weight": m.dequantize_weight().clone(),
                      "act_scale": getattr(m, "act_scale", None)}
        elif isinstance(m, VQLinear):  # "scale": the codebooks (what a step is made of)
            out[n] = {"codes": m.codes.clone(), "scale": m.codebooks.float().clone(),
                      "weight": m.dequantize_weight().clone()}
    return out


def observers(n_batches: int) -> dict:
    """Per-channel MinMaxObserver on this rank's shard, synced, vs one on all the data."""
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(8, 5, generator=g) * (i + 1) for i in range(n_batches)]
    mine, ref = (MinMaxObserver("int8", granularity="channel", axis=1) for _ in range(2))
    for x in D.shard(data, D.resolve(True)):
        mine(x)
    for x in data:
        ref(x)
    assert D.sync_observers(nn.Sequential(mine)) == 1
    return {"min": mine.min_val, "max": mine.max_val, "ref_min": ref.min_val,
            "ref_max": ref.max_val, "scale": mine.calculate_qparams()[0],
            "ref_scale": ref.calculate_qparams()[0]}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else LM.output(model, ids)


def _bytelm(n_batches: int):
    from qkern.models import load_llama
    from qkern.models.assets import WIKITEXT_BYTELM, WIKITEXT_TEXT, shipped_path
    from qkern.quantization import text_calibration

    calib = text_calibration(shipped_path(WIKITEXT_TEXT.format(split="valid")), "bytes",
                             n_samples=n_batches + 1, seqlen=32)
    return load_llama(shipped_path(WIKITEXT_BYTELM)), calib[:-1], calib[-1]


def quantize(method: str, n_batches: int) -> dict:
    if method in BYTELM:
        model, calib, ids = _bytelm(n_batches)
    else:
        model, calib = LM.build("llama"), LM.calibration(n_batches, 16)
        ids = LM.calibration(1, 16, seed=7)[0]
    if method in BYTELM or method in CHOICES:  # the quantizer itself: its choices too
        qz = quantizer_for(CONFIGS[method]())
        q = quantize_sequential(model, qz, calib, progress=False)
        extra = {k: getattr(qz, k) for k in CHOICES.get(method, AWQ_CHOICES)}
        return {"layers": layers(q), "logits": _logits(q, ids), **extra}
    q = qkern.quantize_model(model, CONFIGS[method](), calib, progress=False)
    return {"layers": layers(q), "logits": LM.output(q, ids),
            "report": [(r.name, r.error) for r in q.qkern_report]}


def main(out: str, jobs: list[str]) -> None:
    """Runs each job ``method:batches`` in turn, writing OUT/<method>_<batches>_rank<r>.pt."""
    torch.set_num_threads(1)
    rank = 0
    if "RANK" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        rank = dist.get_rank()
    for job in jobs:
        method, n = job.split(":")
        res = observers(int(n)) if method == "observers" else quantize(method, int(n))
        torch.save(res, os.path.join(out, f"{method}_{n}_rank{rank}.pt"))
    if "RANK" in os.environ:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
