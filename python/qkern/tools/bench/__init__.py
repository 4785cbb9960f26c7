"""``qkern bench SUITE ...`` (also ``python -m qkern.tools.bench SUITE ...``): qkern's speed
next to torch peers, in one process run.

- ``core``: quantize / dequantize / pack on the CPU (:mod:`.core`);
- ``matmul``: quantized Linear layers against torch's and other peers (:mod:`.matmul`);
- ``decode``: a real model's generation speed and quality, fp32 vs quantized, or a synthetic
  337M-parameter Llama beside llama.cpp (:mod:`.decode`, :mod:`.decode_synth`);
- ``overhead``: the per-call cost of a tiny layer from Python, qkern vs torch (:mod:`.overhead`);
- ``vq``: the vector quantizers of :mod:`qkern.vq` beside FAISS's: reconstruction error, search
  recall, training and encoding time on digits and MiniLM embeddings (:mod:`.vq`).

The timing method shared by all of them is in :mod:`.timing`.
"""

from __future__ import annotations

import sys

from . import core, decode, matmul, overhead, vq

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Runs the suite named by ``argv[0]``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["matmul"]:
        return matmul.main(argv[1:])
    if argv[:1] == ["decode"]:
        return decode.main(argv[1:])
    if argv[:1] == ["overhead"]:
        return overhead.main(argv[1:])
    if argv[:1] == ["vq"]:
        return vq.main(argv[1:])
    return core.main(argv)
