"""GGUF export checked by llama.cpp: the wikitext-bytelm, quantized by qkern, exported with
``qkern.export(..., format="gguf")`` and run by llama.cpp (llama-cpp-python), beside qkern.

Rows (one per GGUF type):

- F32: the float model (checks metadata, tensor names, the q/k permutation, the tokenizer);
- Q8_0: qkern RTN int8 per output channel (qkern's w8 kernel), written as Q8_0 with each row's
  scale repeated over its 32-blocks, rounded to fp16;
- Q4_0: qkern RTN int4 symmetric, groups of 32 (w4 kernel), written as Q4_0 (codes as they are,
  scales rounded to fp16);
- Q6_K, Q4_K: the float model quantized by qkern's K-quant encoders (the same bytes as
  llama.cpp's quantizer); "qkern (orig)" is then the float model. Imported back, Q6_K runs on
  qkern exactly (int6 / uint6 groups of 16), Q4_K with ``unsupported="float"`` (its exact values
  as float weights: qkern cannot hold d*sc*q - dmin*m); ffn_down (672 columns) takes llama.cpp's
  fallback types Q8_0 / Q5_0;
- llama-Q4_0, llama-Q6_K: qkern's F32 export quantized by llama.cpp itself
  (``llama_model_quantize``: its mixes, the output in Q6_K, ggml's negative Q4_0 scales), then
  imported by qkern (exactly: QuantLinear layers) - a "community" GGUF on qkern's kernels.

For each: the GGUF file is imported back with ``qkern.from_pretrained`` (the exact weights of the
file, on qkern's kernels: "qkern (gguf)"), and compared with llama.cpp on WikiText-2 test:
bits per byte over ``--windows`` windows of 256 bytes (each window predicts bytes 1..255 from
its prefix), the largest |logit difference| per position (median and max over positions), and a
greedy continuation of ``--new`` bytes after a 64-byte prompt (bytes that agree before the first
difference). "qkern (orig)" is qkern's quantized model before export (fp32 scales).

llama.cpp quantizes activations to 8 bits inside its Q4_0 / Q8_0 dot products (and rounds them
differently on each CPU), so logits differ a little from qkern's float32 matmuls on the same
weights; the tolerance stated in the docs (docs/serving/gguf.md) is what this script shows.

Needs llama-cpp-python (PYTHONPATH=/work/refs/llamacpp after
``pip install --target /work/refs/llamacpp --no-deps llama-cpp-python diskcache``).

Run: PYTHONPATH=python:/work/refs/llamacpp python bench/interop_llamacpp.py [--windows 16]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import qkern
from qkern.models import load_pretrained
from qkern.models.assets import shipped_path
from qkern.tools.bench.decode_synth import llama_cpp_greedy

WINDOW = 256


#: files quantized by llama.cpp itself (llama_model_quantize, its Q4_0 mix: output Q6_K)
LLAMA_FTYPES = {"llama-Q4_0": 2, "llama-Q6_K": 18}


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import ctypes

    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                      ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src}")


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (len(ids), vocab) of one sequence from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


@torch.inference_mode()
def qkern_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].double().numpy()


@torch.inference_mode()
def qkern_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def nll_bits(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    lg = logits[:-1]
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll = lse - lg[np.arange(len(ids) - 1), ids[1:]]
    return float(nll.sum() / math.log(2)), len(ids) - 1


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--types", nargs="+",
                    default=["F32", "Q8_0", "Q4_0", "Q6_K", "Q4_K", "llama-Q4_0", "llama-Q6_K"])
    args = ap.parse_args()
    from llama_cpp import Llama  # optional: the consumer under test

    torch.set_num_threads(args.threads)
    text = shipped_path("data/wikitext-2/wiki.test.tokens").read_bytes()
    windows = [list(text[i * WINDOW:(i + 1) * WINDOW]) for i in range(args.windows)]
    model = load_pretrained(shipped_path("models/wikitext-bytelm"))
    configs = {"F32": None, "Q8_0": qkern.RTNConfig(bits=8, group_size=None),
               "Q4_0": qkern.RTNConfig(bits=4, group_size=32, sym=True), "Q6_K": None,
               "Q4_K": None}
    print(f"wikitext-bytelm, WikiText-2 test: {args.windows} windows x {WINDOW} bytes; greedy "
          f"{args.new} bytes after a 64-byte prompt of each of the first 4 windows")
    print(f"{'type':10} {'model':13} {'bits/byte':>9} {'|dlogit| med':>12} {'max':>7} "
          f"{'greedy agree':>12} {'time s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for typ in args.types:
            qm = model if configs.get(typ) is None else qkern.quantize_model(model, configs[typ])
            path = Path(tmp) / f"bytelm-{typ}.gguf"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if typ in LLAMA_FTYPES:  # llama.cpp's own quantizer on qkern's F32 export
                    f32 = qkern.export(model, Path(tmp) / "f32.gguf", format="gguf",
                                       type="F32", overwrite=True)
                    llama_quantize(f32, path, LLAMA_FTYPES[typ])
                else:
                    qkern.export(qm, path, format="gguf", type=typ)
            hows = sorted({h for w in caught for h in ("fp16 scales", "requantized")
                           if f": {h})" in str(w.message)})
            if configs.get(typ) is None:
                hows = ["float" if typ == "F32" else "by llama.cpp's quantizer"
                        if typ in LLAMA_FTYPES else "from float"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = qkern.from_pretrained(path, unsupported="float")
            t0 = time.perf_counter()
            llm = Llama(str(path), n_ctx=WINDOW, n_batch=WINDOW, n_threads=args.threads,
                        logits_all=True, verbose=False)
            t_load = time.perf_counter() - t0
            rows = {"qkern (gguf)": back, "qkern (orig)": qm, "llama.cpp": llm}
            ref = {}
            for name, m in rows.items():
                t0 = time.perf_counter()
                bits, n, dl, gen = 0.0, 0, [], []
                for w in windows:
                    lg = llama_cpp_logits(m, w) if name == "llama.cpp" else qkern_logits(m, w)
                    b, c = nll_bits(lg, w)
                    bits, n = bits + b, n + c
                    if name == "qkern (gguf)":
                        ref.setdefault("logits", []).append(lg)
                    else:
                        dl.append(np.abs(lg - ref["logits"][len(dl)]).max(-1))
                for w in windows[:4]:
                    fn = llama_cpp_greedy if name == "llama.cpp" else qkern_greedy
                    gen.append(fn(m, w[:64], args.new))
                if name == "qkern (gguf)":
                    ref["gen"] = gen
                el = time.perf_counter() - t0
                a = sum(agree(g, r) for g, r in zip(gen, ref.get("gen", gen)))
                d = np.concatenate(dl) if dl else None
                med = f"{np.median(d):12.4f}" if d is not None else f"{'':12}"
                mx = f"{d.max():7.4f}" if d is not None else f"{'':7}"
                print(f"{typ:10} {name:13} {bits / n:9.4f} {med} {mx} "
                      f"{a:>5}/{4 * args.new:<6} {el:7.2f}")
            print(f"           (layers written: {', '.join(hows) or 'bit-exact'}; "
                  f"llama.cpp load {t_load:.2f} s)")
            del llm


if __name__ == "__main__":
    main()
