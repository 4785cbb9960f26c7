"""Peak memory (``ru_maxrss`` of this process) of quantizing and of loading the 337M-parameter
synthetic Llama (:func:`~qkern.tools.bench.decode_synth.synthetic_llama`, 1.35 GB float32),
RTN int4 g128. Run one step per process, so each peak is its own::

    python -m qkern.tools.bench.memory quantize          # float model, then quantize_model
    python -m qkern.tools.bench.memory save OUT.safetensors
    python -m qkern.tools.bench.memory load OUT.safetensors --float   # float model, then load
    python -m qkern.tools.bench.memory load OUT.safetensors           # empty_init, then load

Each prints the resident set after its steps and the peak, in MB.
"""

from __future__ import annotations

import argparse
import gc
import resource

from ... import RTNConfig, empty_init, load, quantize_model, save
from ...models import Llama
from .decode_synth import CONFIG, synthetic_llama
from .timing import rss_bytes

__all__ = ["main"]


def _mb() -> str:
    rss = rss_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return f"rss {rss / 2**20:.0f} MB, peak {peak / 2**20:.0f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkern.tools.bench.memory")
    ap.add_argument("step", choices=("quantize", "save", "load"))
    ap.add_argument("path", nargs="?")
    ap.add_argument("--float", action="store_true", help="load onto a float model")
    args = ap.parse_args(argv)
    print(f"start: {_mb()}")
    cfg = RTNConfig(bits=4, group_size=128)
    if args.step in ("quantize", "save"):
        model = synthetic_llama()
        gc.collect()
        print(f"float model built: {_mb()}")
        q = quantize_model(model, cfg, progress=False, inplace=args.step == "save")
        del model
        gc.collect()
        print(f"quantized: {_mb()}")
        if args.step == "save":
            save(q, args.path, overwrite=True)
        return 0
    if args.float:
        model = synthetic_llama()
    else:
        with empty_init():
            model = Llama(CONFIG)
    print(f"model built: {_mb()}")
    q = load(args.path, model)
    del model
    gc.collect()
    size = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    print(f"loaded ({size / 2**20:.0f} MB of tensors): {_mb()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
