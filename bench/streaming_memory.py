"""Peak memory of ``qkern.quantize_pretrained`` (streamed from disk) vs the in-memory path,
for synthetic Llama checkpoints of a few sizes, the streamed runs under an enforced limit.

Per size: a synthetic LlamaForCausalLM (random float32 weights) is saved with
``save_pretrained``; then, each in a fresh process, GPTQ int4 g128 runs
(a) streamed: ``qkern.quantize_pretrained(dir, cfg, out, cal)`` under
    ``RLIMIT_AS = baseline + budget``, and
(b) in memory: ``load_pretrained`` + ``quantize_model`` + ``export(format="qkern")``, with no
    limit (and, for the largest size, again under the same limit: it must fail).
The child measures its baseline address space (VmSize) after importing torch, transformers
and qkern and warming up torch's thread pool and BLAS, then sets the limit; its peak RSS is
``ru_maxrss``. The parent compares the two outputs tensor by tensor (bit for bit), prints
a table, writes the figures as JSON and plots peak RSS vs checkpoint size.

    PYTHONPATH=python python bench/streaming_memory.py [--layers 2,5,19] [--budget BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(a: dict) -> dict:
    """One run in this (fresh) process; returns its figures."""
    import resource

    import torch
    import transformers  # noqa: F401  (part of the baseline)

    import qkern
    from qkern.models import load_pretrained
    from qkern.streaming import quantize_pretrained

    torch.set_num_threads(a["threads"])
    x = torch.randn(256, 256)
    torch.linalg.cholesky(x @ x.T + 256 * torch.eye(256))  # BLAS / LAPACK / OpenMP warm-up
    base_vm, base_rss = _status("VmSize:"), _status("VmRSS:")
    limit = None
    if a["budget"] is not None:
        limit = base_vm + a["budget"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, a["vocab"], (1, a["seqlen"]), generator=g)
           for _ in range(a["samples"])]
    cfg = qkern.GPTQConfig(bits=4, group_size=128)
    t0, ok, err = time.time(), True, None
    try:
        if a["mode"] == "stream":
            quantize_pretrained(a["src"], cfg, a["out"], cal, resume=False, progress=False)
        else:
            q = qkern.quantize_model(load_pretrained(a["src"]), cfg, cal, inplace=True,
                                     progress=False)
            qkern.export(q, a["out"], format="qkern", overwrite=True)
    except (MemoryError, RuntimeError, OSError) as e:
        ok, err = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": a["mode"], "ok": ok, "error": err, "secs": time.time() - t0,
            "base_vm": base_vm, "base_rss": base_rss, "limit": limit, "budget": a["budget"],
            "peak_rss": peak}


def make_checkpoint(a: dict) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["inter"],
        num_hidden_layers=a["layers"], num_attention_heads=16, num_key_value_heads=16,
        max_position_embeddings=max(512, a["seqlen"]), tie_word_embeddings=False)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(a["src"], max_shard_size="200MB")


#: glibc malloc settings of every child (both paths): allocations of 1 MiB and more are
#: mmap'd and given back to the OS when freed (the default threshold rises up to 32 MiB as
#: large blocks are freed, after which a freed block's memory stays in the heap), one arena
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(2 ** 20),
              "MALLOC_TRIM_THRESHOLD_": str(2 ** 20)}


def _spawn(kind: str, a: dict) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": str(a["threads"]),
           **(MALLOC_ENV if a.get("malloc_env", True) else {})}
    r = subprocess.run([sys.executable, __file__, f"--{kind}", json.dumps(a)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{r.stderr[-3000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _dir_bytes(p: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in p.glob(pattern))


def same_tensors(x: Path, y: Path) -> tuple[bool, int]:
    """Whether two checkpoint folders hold the same tensors bit for bit (read one at a time);
    and how many tensors were compared."""
    import torch
    from safetensors import safe_open

    def where(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    wx, wy = where(x), where(y)
    if set(wx) != set(wy):
        return False, 0
    for k in wx:
        with safe_open(str(wx[k]), "pt") as hx, safe_open(str(wy[k]), "pt") as hy:
            tx, ty = hx.get_tensor(k), hy.get_tensor(k)
        if tx.dtype != ty.dtype or tx.shape != ty.shape or not torch.equal(tx, ty):
            return False, len(wx)
    return True, len(wx)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mb = 2 ** 20
    size = [r["ckpt"] / mb for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(size, [r["memory"]["peak_rss"] / mb for r in rows], "o-",
            label="in memory (load_pretrained + quantize_model + export)")
    ax.plot(size, [r["stream"]["peak_rss"] / mb for r in rows], "s-",
            label="streamed (quantize_pretrained), under the limit")
    ax.plot(size, [r["stream"]["base_rss"] / mb for r in rows], ":", color="gray",
            label="baseline RSS after imports (both)")
    ax.plot(size, size, "--", color="lightgray", label="checkpoint size")
    lim = rows[-1]["stream"]["budget"]
    ax.axhline((rows[-1]["stream"]["base_rss"] + lim) / mb, color="C1", lw=0.8, ls="-.",
               label=f"baseline RSS + budget ({lim / mb:.0f} MiB)")
    ax.set_xlabel("fp32 checkpoint size (MiB)")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title("GPTQ int4 g128 of a synthetic Llama: peak memory")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,5,19", help="blocks per model, one model each")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=int, default=None,
                   help="bytes of address space above the baseline for the streamed runs "
                        "(default: a third of the largest checkpoint)")
    p.add_argument("--glibc-default", action="store_true",
                   help="run the children without MALLOC_ENV (glibc's default thresholds)")
    p.add_argument("--work", default="/tmp/qkern-streaming-bench")
    p.add_argument("--json", default=str(ROOT / "docs/images/streaming_memory.json"))
    p.add_argument("--plot", default=str(ROOT / "docs/images/streaming_memory.png"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = {k: getattr(args, k) for k in ("hidden", "inter", "vocab", "samples", "seqlen",
                                            "threads")}
    common["malloc_env"] = not args.glibc_default
    layers = [int(x) for x in args.layers.split(",")]
    srcs = []
    for n in layers:
        src = work / f"llama-{n}"
        if not (src / "config.json").is_file():
            shutil.rmtree(src, ignore_errors=True)
            _spawn("make", {**common, "layers": n, "src": str(src)})
        srcs.append(src)
    budget = args.budget or _dir_bytes(srcs[-1]) // 3
    rows = []
    for n, src in zip(layers, srcs):
        ckpt = _dir_bytes(src)
        base = {**common, "src": str(src)}
        st = _spawn("child", {**base, "mode": "stream", "budget": budget,
                              "out": str(work / f"out-stream-{n}")})
        mem = _spawn("child", {**base, "mode": "memory", "budget": None,
                               "out": str(work / f"out-memory-{n}")})
        same, count = same_tensors(work / f"out-stream-{n}", work / f"out-memory-{n}") \
            if st["ok"] and mem["ok"] else (False, 0)
        row = {"layers": n, "ckpt": ckpt, "stream": st, "memory": mem, "bit_identical": same,
               "tensors": count, "out_bytes": _dir_bytes(work / f"out-stream-{n}")}
        if n == layers[-1]:
            row["memory_under_limit"] = _spawn("child", {**base, "mode": "memory",
                                                         "budget": budget,
                                                         "out": str(work / "out-memory-lim")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    mb = 2 ** 20
    print(f"\nbudget above the baseline: {budget / mb:.0f} MiB (largest checkpoint / 3)")
    print("| layers | fp32 checkpoint | streamed peak RSS (under limit) | in-memory peak RSS "
          "| baseline RSS | streamed s | in-memory s | bit-identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, m = r["stream"], r["memory"]
        print(f"| {r['layers']} | {r['ckpt'] / mb:.0f} MiB | "
              f"{s['peak_rss'] / mb:.0f} MiB{'' if s['ok'] else ' FAILED'} | "
              f"{m['peak_rss'] / mb:.0f} MiB | {s['base_rss'] / mb:.0f} MiB | {s['secs']:.0f} | "
              f"{m['secs']:.0f} | {'yes' if r['bit_identical'] else 'NO'} ({r['tensors']}) |")
    lim = rows[-1].get("memory_under_limit")
    if lim:
        print(f"in-memory path under the same limit: {'ok' if lim['ok'] else lim['error']}")
    Path(args.json).write_text(json.dumps({"args": vars(args), "budget": budget,
                                           "rows": rows, "when": time.ctime()}, indent=1))
    plot(rows, Path(args.plot))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--make":
        make_checkpoint(json.loads(sys.argv[2]))
    else:
        main()
