"""Peak memory of the block-by-block LLM pipeline vs the model's size.

Builds a synthetic transformers LlamaForCausalLM (random weights, float32) in a fresh process
per setting, resets the peak-RSS counter (/proc/self/clear_refs), quantizes it (RTN or GPTQ
int4 g128) with and without ``inplace``, and prints the peak resident memory above the
memory the float model already held, next to the model's and one block's size.

    python bench/llm_memory.py [--layers 8] [--hidden 1024] [--method rtn|gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, torch, transformers, qkern
from qkern.quantization import find_blocks
a = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(2)
cfg = transformers.LlamaConfig(vocab_size=a["vocab"], hidden_size=a["hidden"],
    intermediate_size=a["inter"], num_hidden_layers=a["layers"], num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=512)
with torch.no_grad():
    model = transformers.LlamaForCausalLM(cfg).eval()
nbytes = sum(p.numel() * 4 for p in model.parameters())
block = sum(p.numel() * 4 for p in find_blocks(model)[1][0].parameters())
g = torch.Generator().manual_seed(1)
cal = [torch.randint(0, a["vocab"], (1, a["seqlen"]), generator=g) for _ in range(a["samples"])]
if a["method"] == "gptq":
    c = qkern.quantization.registered_configs()["GPTQConfig"](bits=4, group_size=128)
else:
    c = qkern.RTNConfig(bits=4, group_size=128)
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t = time.time()
q = qkern.quantize_model(model, c, cal, inplace=a["inplace"], progress=False)
secs = time.time() - t
print(json.dumps({"model": nbytes, "block": block, "base": base, "peak": rss("VmHWM:"),
                  "secs": secs}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    a = p.parse_args()
    args = {"layers": a.layers, "hidden": a.hidden, "inter": a.hidden * 11 // 4 // 32 * 32,
            "vocab": a.vocab, "samples": a.samples, "seqlen": a.seqlen, "method": a.method}
    mib = 1 << 20
    print(f"synthetic Llama: {a.layers} layers, hidden {a.hidden}, {a.method} int4 g128, "
          f"{a.samples} x {a.seqlen} calibration tokens")
    print(f"{'inplace':>8} {'model MiB':>10} {'block MiB':>10} {'peak above model MiB':>21} "
          f"{'= x model':>10} {'= x block':>10} {'s':>6}")
    for inplace in (False, True):
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**args,
                              "inplace": inplace})], capture_output=True, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = r["peak"] - r["base"]
        print(f"{str(inplace):>8} {r['model'] / mib:10.0f} {r['block'] / mib:10.1f} "
              f"{extra / mib:21.0f} {extra / r['model']:10.2f} {extra / r['block']:10.1f} "
              f"{r['secs']:6.1f}")


if __name__ == "__main__":
    main()
