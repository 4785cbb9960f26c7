"""Speed of qkern's CPU kernels next to their torch peers, in one process run.

    qkern bench core [--threads 2] [--repeats 9] [--quick] [--shape 4096x4096 ...]
    python -m qkern.tools.bench core ...   (the same)

Method:

* torch and qkern get the same threads (``torch.set_num_threads`` and
  ``qkern.set_num_threads``), the same float32 weight, the same shapes, in the same run.
* Every operation is timed as an alternating series: each repeat runs every implementation
  once (the order rotating every repeat) together with two bandwidth probes, a torch copy of
  a large buffer and a sum of it; times are medians (``time.perf_counter``) after warm-up calls,
  with the garbage collector off. Before every timed call the caches are flushed (a read of
  twice the last-level cache) and the cores left idle for ``--settle-ms`` (torch's OpenMP
  workers spin for milliseconds after each parallel region and would otherwise compete with
  the next call's threads), so every call starts cold and on idle cores. Outputs are freed
  after the clock stops; their allocation (and first-touch page faults) is inside, as a user
  sees it. Rows whose implementations would overrun a per-row time budget use fewer repeats
  (at least 3; the table's ``n`` column).
* Bytes of an operation = bytes read + bytes written by the operation itself: float32 input
  (4 B/element), one byte per code, float32 scales, packed bytes. The same nominal count is
  used for every implementation in a row; GB/s = 1e9 bytes/s.
* The roofline is the copy bandwidth of the same run: (read + write bytes) / time of
  ``dst.copy_(src)``, the median over all probe samples taken between the rows. copy_ also
  pays a read-for-ownership of every byte it writes, so a kernel that reads more than it
  writes can pass 100 % of it (quantize: up to ~125 %, pack: ~110 %).
* "qkern" is the public Python API (``qkern.quantize(...)``, ``QTensor.dequantize()``,
  ``qkern.pack_bits``); "op" is the registered ``torch.ops.qkern.*`` op called directly on
  flat tensors, so the cost of the Python layer is the difference between the two.
* "vs torch" is torch time / qkern time (above 1: qkern is faster).
* torch's allocator uses 4 KiB pages for large tensors unless ``THP_MEM_ALLOC_ENABLE=1``;
  qkern's ops ask for transparent huge pages (madvise) on outputs of 4 MiB and more.
* The "out=" rows write into preallocated outputs (``qkern.quantize(..., out=qt)``,
  ``qt.dequantize(out=t)``, ``torch.ops.qkern.*_out``): the cost of the kernel and the Python
  layer without allocation or first-touch page faults. On machines where page faults
  are expensive this alone makes torch peers that allocate large temporaries several times
  slower; the machine line says which setting the run used.

``--quick`` (one shape, few repeats, small probe) is a smoke test; a full run takes a few
minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import qkern
from qkern import formats as F

from .timing import Flusher, Probe, machine_line, time_alternating

_OPS = torch.ops.qkern


# ---- pure-torch peers --------------------------------------------------------------------


def torch_group_quantize(w: torch.Tensor, group: int, qmax: int):
    """Symmetric absmax int quantization in groups of ``group`` consecutive elements, in
    plain torch ops (the peer for formats torch has no quantized dtype for)."""
    wg = w.reshape(-1, group)
    scale = wg.abs().amax(dim=1, keepdim=True).div_(qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (wg / scale).round_().clamp_(-qmax - 1, qmax).to(torch.int8)
    return q.view(w.shape), scale


def torch_group_dequantize(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    return q.reshape(-1, group).to(torch.float32).mul_(scale).view(q.shape)


def torch_nf4_quantize(w: torch.Tensor, mids: torch.Tensor, block: int = 64):
    """NF4 in plain torch: block absmax, then the nearest table entry by bucketizing on the
    midpoints between the 16 values (ties may differ from qkern's nearest-even)."""
    wg = w.reshape(-1, block)
    scale = wg.abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.bucketize(wg / scale, mids, out_int32=True).to(torch.uint8)
    return codes.view(w.shape), scale


def torch_lut_dequantize(codes: torch.Tensor, scale: torch.Tensor, table: torch.Tensor,
                         block: int = 64) -> torch.Tensor:
    idx = codes.reshape(-1).to(torch.int32)
    return torch.index_select(table, 0, idx).view(-1, block).mul_(scale).view(codes.shape)


def torch_pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, first element in the low nibble (qkern order='lsb')."""
    u = codes.reshape(-1, 2).view(torch.uint8)
    return (u[:, 0] & 15) | (u[:, 1] << 4)


_SHIFT3 = torch.arange(0, 24, 3, dtype=torch.int32)


def torch_pack3(codes: torch.Tensor) -> torch.Tensor:
    """Eight 3-bit codes -> three bytes, LSB first (qkern order='lsb')."""
    u = codes.reshape(-1, 8).view(torch.uint8).to(torch.int32).bitwise_and_(7)
    acc = (u << _SHIFT3).sum(dim=1, dtype=torch.int32)  # fields do not overlap: sum == or
    return torch.stack([acc & 255, (acc >> 8) & 255, acc >> 16], dim=1).to(torch.uint8).view(-1)


# ---- the cases ---------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    shape: tuple[int, int]
    nbytes: int
    peer_name: str
    impls: dict[str, Callable[[], object]]  # keys: "torch", "qkern", "op"
    result: dict[str, float] = field(default_factory=dict)
    repeats: int = 0


def _quant_bytes(n: int, n_scales: int) -> int:
    return 4 * n + n + 4 * n_scales  # float32 in; one byte per code + float32 scales out


def _dequant_bytes(n: int, n_scales: int) -> int:
    return n + 4 * n_scales + 4 * n


def build_cases(shape: tuple[int, int]) -> list[Case]:
    rows, cols = shape
    n = rows * cols
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * 0.02
    flat = w.view(-1)
    cases: list[Case] = []

    def add(name, nbytes, peer_name, **impls):
        cases.append(Case(name, shape, nbytes, peer_name, impls))

    # -- quantize
    zp_rows = torch.zeros(rows, dtype=torch.int64)
    add("quantize int8 per-tensor", _quant_bytes(n, 1), "quantize_per_tensor (+amax)",
        torch=lambda: torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8),
        qkern=lambda: qkern.quantize(w, "int8"),
        op=lambda: _OPS.quantize_affine_dynamic(flat, n, -128, 127, F.SCALE_ABSMAX, 127.0, 0,
                                                0, 0, 0.0, 0))
    add("quantize int8 per-channel", _quant_bytes(n, rows), "quantize_per_channel (+amax)",
        torch=lambda: torch.quantize_per_channel(w, w.abs().amax(dim=1).div_(127), zp_rows, 0,
                                                 torch.qint8),
        qkern=lambda: qkern.quantize(w, "int8", granularity="channel"),
        op=lambda: _OPS.quantize_affine_dynamic(flat, cols, -128, 127, F.SCALE_ABSMAX, 127.0, 0,
                                                0, 0, 0.0, 0))
    add("quantize int4 per-channel", _quant_bytes(n, rows), "pure torch",
        torch=lambda: torch_group_quantize(w, cols, 7),
        qkern=lambda: qkern.quantize(w, "int4", granularity="channel"),
        op=lambda: _OPS.quantize_affine_dynamic(flat, cols, -8, 7, F.SCALE_ABSMAX, 7.0, 0, 0, 0,
                                                0.0, 0))
    add("quantize int4 group-128", _quant_bytes(n, n // 128), "pure torch",
        torch=lambda: torch_group_quantize(w, 128, 7),
        qkern=lambda: qkern.quantize(w, "int4", granularity="group", group_size=128),
        op=lambda: _OPS.quantize_affine_dynamic(flat, 128, -8, 7, F.SCALE_ABSMAX, 7.0, 0, 0, 0,
                                                0.0, 0))
    nf4 = F.get("nf4")
    vals_np, cods_np = nf4.search_table
    vals, cods = torch.from_numpy(vals_np), torch.from_numpy(cods_np)
    mids = ((vals[1:] + vals[:-1]) / 2).contiguous()
    add("quantize nf4 block-64", _quant_bytes(n, n // 64), "pure torch (bucketize)",
        torch=lambda: torch_nf4_quantize(w, mids),
        qkern=lambda: qkern.quantize(w, "nf4"),
        op=lambda: _OPS.quantize_codebook_dynamic(flat, vals, cods, nf4.sign_bit, 64,
                                                  nf4.scale_rule, nf4.max_value, nf4.emax, 0, 0))

    # -- dequantize (each from its own quantized tensor)
    tq_t = torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8)
    qt_t = qkern.quantize(w, "int8")
    add("dequantize int8 per-tensor", _dequant_bytes(n, 1), "Tensor.dequantize()",
        torch=tq_t.dequantize, qkern=qt_t.dequantize,
        op=_bind(_OPS.dequantize_affine, qt_t.codes.view(torch.uint8).view(-1),
                 qt_t.scale.reshape(-1), None, n, True, 0.0))
    tq_c = torch.quantize_per_channel(w, w.abs().amax(dim=1) / 127, zp_rows, 0, torch.qint8)
    qt_c = qkern.quantize(w, "int8", granularity="channel")
    add("dequantize int8 per-channel", _dequant_bytes(n, rows), "Tensor.dequantize()",
        torch=tq_c.dequantize, qkern=qt_c.dequantize,
        op=_bind(_OPS.dequantize_affine, qt_c.codes.view(torch.uint8).view(-1),
                 qt_c.scale.reshape(-1), None, cols, True, 0.0))
    tq_g, ts_g = torch_group_quantize(w, 128, 7)
    qt_g = qkern.quantize(w, "int4", granularity="group", group_size=128)
    add("dequantize int4 group-128", _dequant_bytes(n, n // 128), "pure torch",
        torch=_bind(torch_group_dequantize, tq_g, ts_g, 128), qkern=qt_g.dequantize,
        op=_bind(_OPS.dequantize_affine, qt_g.codes.view(torch.uint8).view(-1),
                 qt_g.scale.reshape(-1), None, 128, True, 0.0))
    tq_n, ts_n = torch_nf4_quantize(w, mids)
    qt_n = qkern.quantize(w, "nf4")
    lut = torch.from_numpy(nf4.lut)
    add("dequantize nf4 block-64", _dequant_bytes(n, n // 64), "pure torch (index_select)",
        torch=_bind(torch_lut_dequantize, tq_n, ts_n, vals), qkern=qt_n.dequantize,
        op=_bind(_OPS.dequantize_lut, qt_n.codes.view(-1), qt_n.scale.reshape(-1), lut, 64))

    # -- the same into preallocated outputs (out=): no allocation, no first-touch page faults
    _out_cases(add, w, n, rows, cols, qt_t, qt_c, qt_g)

    # -- bit packing of one-byte codes (the int4 group-128 codes; random 3-bit codes)
    c4 = qt_g.codes
    c4u = c4.view(torch.uint8).view(-1)
    c8 = qt_c.codes
    c8u = c8.view(torch.uint8).view(-1)
    c3 = torch.randint(0, 8, shape, dtype=torch.uint8, generator=gen)
    c3u = c3.view(-1)
    add("pack 4-bit", n + n // 2, "pure torch (nibble ops)",
        torch=_bind(torch_pack4, c4), qkern=_bind(qkern.pack_bits, c4, 4),
        op=_bind(_OPS.pack_bits, c4u, 4, False))
    add("pack 8-bit", 2 * n, "clone()",
        torch=c8u.clone, qkern=_bind(qkern.pack_bits, c8, 8),
        op=_bind(_OPS.pack_bits, c8u, 8, False))
    add("pack 3-bit", n + (3 * n + 7) // 8, "pure torch (shift+sum)",
        torch=_bind(torch_pack3, c3), qkern=_bind(qkern.pack_bits, c3, 3),
        op=_bind(_OPS.pack_bits, c3u, 3, False))
    return cases


def _out_cases(add, w, n, rows, cols, qt_t, qt_c, qt_g) -> None:
    """Rows of ``qkern.quantize(..., out=qt)`` / ``qt.dequantize(out=t)`` and the ``*_out``
    ops; the torch peer is the allocating one of the row above (torch has no out= for these)."""
    flat = w.view(-1)
    i32 = torch.empty(0, dtype=torch.int32)
    for what, qt, g, kw in (("int8 per-tensor", qt_t, n, {}),
                            ("int8 per-channel", qt_c, cols, {"granularity": "channel"}),
                            ("int4 group-128", qt_g, 128, {"granularity": "group",
                                                           "group_size": 128})):
        fmt = qt.format
        q = qkern.quantize(w, fmt.name, **kw)
        codes, scale = q.codes.view(-1), q.scale.view(-1)
        peer = torch.quantize_per_tensor if g == n else None
        add(f"quantize {what} out=", _quant_bytes(n, n // g), "allocating peer",
            torch=(lambda p=peer: p(w, float(w.abs().max()) / 127, 0, torch.qint8)) if peer else
            (lambda g=g, qmax=fmt.qmax: torch_group_quantize(w, g, qmax)),
            qkern=lambda q=q, kw=kw, name=fmt.name: qkern.quantize(w, name, out=q, **kw),
            op=lambda g=g, fmt=fmt, codes=codes, scale=scale: _OPS.quantize_affine_dynamic_out(
                flat, g, fmt.qmin, fmt.qmax, F.SCALE_ABSMAX, float(fmt.qmax), 0, 0, 0, 0.0, 0,
                codes, scale, i32))
        out = torch.empty(w.shape)
        tq, ts = torch_group_quantize(w, g, fmt.qmax)
        add(f"dequantize {what} out=", _dequant_bytes(n, n // g), "allocating peer",
            torch=_bind(torch_group_dequantize, tq, ts, g),
            qkern=lambda qt=qt, out=out: qt.dequantize(out=out),
            op=lambda qt=qt, g=g, out=out: _OPS.dequantize_affine_out(
                qt.codes.view(torch.uint8).view(-1), qt.scale.reshape(-1), None, g, True, 0.0,
                out.view(-1)))


def _bind(fn, *args):
    return lambda: fn(*args)


# ---- report ------------------------------------------------------------------------------


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def format_table(cases: list[Case], copy_gbs: float) -> str:
    """The table; "% copy" against the row's own ``copy_`` of its bytes, timed as the row
    (``copy_gbs``, the run's roofline, where a row has none)."""
    def rate(c: Case, key: str) -> str:
        gbs = c.nbytes / c.result[key] / 1e9
        ref = c.nbytes / c.result["copy"] / 1e9 if "copy" in c.result else copy_gbs
        return f"{gbs:.1f} ({100 * gbs / ref:.0f}%)"

    lines = [
        ("| operation | shape | torch peer | copy ms | torch ms | qkern ms | op ms | "
         "torch GB/s (% copy) | qkern GB/s (% copy) | op GB/s (% copy) | qkern vs torch | "
         "op vs torch | n |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        r = c.result
        cp = f"{1e3 * r['copy']:.2f}" if "copy" in r else "-"
        lines.append(
            f"| {c.op} | {_shape_str(c.shape)} | {c.peer_name} | {cp} | {1e3 * r['torch']:.2f} | "
            f"{1e3 * r['qkern']:.2f} | {1e3 * r['op']:.2f} | {rate(c, 'torch')} | "
            f"{rate(c, 'qkern')} | {rate(c, 'op')} | {r['torch'] / r['qkern']:.2f}x | "
            f"{r['torch'] / r['op']:.2f}x | {c.repeats} |")
    return "\n".join(lines)


def run_core(threads: int, repeats: int, warmup: int, shapes: list[tuple[int, int]],
             probe_mb: int, budget_s: float | None = None, settle_ms: float = 10.0,
             out=sys.stdout) -> list[Case]:
    torch.set_num_threads(threads)
    qkern.set_num_threads(threads)
    t_start = time.perf_counter()
    probe = Probe.make(probe_mb << 20)
    flush = Flusher(settle_ms / 1e3)
    # a first probe series so the roofline exists even for a tiny run
    time_alternating({}, repeats, 0, probe, flush)
    done: list[Case] = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for shape in shapes:
            cases = build_cases(shape)
            for c in cases:
                src = torch.rand(max(1, c.nbytes // 8))  # float32: read + write = the row's bytes
                c.impls["copy"] = _bind(torch.empty_like(src).copy_(src).copy_, src)
                c.result, c.repeats = time_alternating(c.impls, repeats, warmup, probe, flush,
                                                       budget_s)
                r = c.result
                print(f"  {c.op:<28} {_shape_str(shape):>10}: torch {1e3 * r['torch']:8.2f} ms"
                      f"  qkern {1e3 * r['qkern']:8.2f} ms  op {1e3 * r['op']:8.2f} ms",
                      file=sys.stderr, flush=True)
                c.impls = {}
            done.extend(cases)
            del cases
            gc.collect()
    finally:
        if gc_was:
            gc.enable()
    copy_gbs, read_gbs = probe.copy_gbs(), probe.read_gbs()
    elapsed = time.perf_counter() - t_start
    print(f"**Machine** {machine_line(threads)}", file=out)
    print(file=out)
    print(f"**Roofline (same run)** copy bandwidth {copy_gbs:.1f} GB/s (torch `copy_` of "
          f"{probe_mb} MiB float32, read + write bytes, median of {len(probe.copy_s)} samples "
          f"taken between the rows); read bandwidth {read_gbs:.1f} GB/s (`sum` of the same "
          f"buffer).", file=out)
    print(file=out)
    print(f"Median of n alternating repeats (at most {repeats}, fewer for rows whose peer is "
          f"slow) after {warmup} warm-up call(s), in rotating order; before every timed call "
          f"the caches are flushed (a read of {flush.buf.numel() * 4 >> 20} MiB) and the "
          f"cores left idle for {settle_ms:g} ms; bytes = "
          "bytes read + bytes written (float32 input, 1 B per code, float32 scales, packed "
          "bytes), GB/s = 1e9 B/s; qkern = public API (`qkern.quantize`, "
          "`QTensor.dequantize`, `qkern.pack_bits`), op = `torch.ops.qkern.*` on flat tensors; "
          "\"vs torch\" = torch time / qkern time (> 1: qkern faster); copy = torch `copy_` of "
          "a float32 buffer moving the row's bytes (half read, half written), timed with the "
          "row (flushed, idle first), and \"% copy\" against it. copy_ also reads every line "
          "it writes, so kernels that read more than they write can pass 100 % of copy.",
          file=out)
    if os.environ.get("THP_MEM_ALLOC_ENABLE", "0") in ("", "0"):
        print(file=out)
        print("Note: torch's CPU allocator maps large tensors with 4 KiB pages unless "
              "THP_MEM_ALLOC_ENABLE=1 is set, while qkern's ops ask for transparent huge pages "
              "for outputs of 4 MiB and more; peers that allocate large outputs or "
              "temporaries pay the page faults (several ms per 64 MiB on some VMs). Run with "
              "THP_MEM_ALLOC_ENABLE=1 to compare without that cost.", file=out)
    print(file=out)
    print(format_table(done, copy_gbs), file=out)
    print(file=out)
    print(f"({elapsed:.0f} s)", file=out, flush=True)
    return done


def _shape(s: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096, got {s!r}") from None
    if r <= 0 or c <= 0 or c % 128:
        raise argparse.ArgumentTypeError(f"shape needs positive sizes and cols % 128 == 0: {s!r}")
    return r, c


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="qkern bench",
                                description="qkern speed benchmarks against torch peers")
    p.add_argument("suite", choices=["core", "matmul", "decode", "overhead", "vq"],
                   help="core: quantize/dequantize/pack on the CPU; matmul, decode, "
                        "overhead, vq: see --help there")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="threads for torch and qkern (default: 2, or 1 on a 1-CPU machine)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per implementation (default 9; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2; 1 quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: one small shape, few repeats, small probe (< 30 s)")
    p.add_argument("--shape", type=_shape, action="append", dest="shapes",
                   help="weight shape ROWSxCOLS (repeatable; default 4096x4096 and 11008x4096, "
                        "2048x4096 with --quick)")
    p.add_argument("--settle-ms", type=float, default=10.0,
                   help="idle time before every timed call, so spinning OpenMP workers of the "
                        "previous call release the cores (default 10; 0 = none)")
    p.add_argument("--probe-mb", type=int, default=None,
                   help="size of the copy/sum bandwidth probe buffer (default 256; 64 quick)")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be >= 1")
    repeats = a.repeats if a.repeats is not None else (3 if a.quick else 9)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    if repeats < 1 or warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    shapes = a.shapes or ([(2048, 4096)] if a.quick else [(4096, 4096), (11008, 4096)])
    probe_mb = a.probe_mb if a.probe_mb is not None else (64 if a.quick else 256)
    with warnings.catch_warnings():  # torch.quantize_per_* deprecation notices
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        run_core(a.threads, repeats, warmup, shapes, probe_mb, 2.0 if a.quick else 6.0,
                 a.settle_ms)
    return 0
