"""``qkern inspect FILE_OR_DIR``: what a checkpoint holds: its format, each quantized layer's
number format, group size, symmetry, bits per weight and the kernel it runs on (the model is
built on the CPU with ``qkern.from_pretrained``), its size on disk, and which programs load it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open
from torch import nn

from ..formats import get as get_format
from .cmdutil import CONSUMERS, checkpoint_kind, fmt_bytes, load_any, path_bytes

__all__ = ["add_parser", "describe", "layer_rows", "run", "table"]

DESCRIPTIONS = {
    "qkern": "qkern folder (transformers save_pretrained, quant_method 'qkern')",
    "gptq": "GPTQ folder (quant_method 'gptq')",
    "awq": "AWQ GEMM folder (quant_method 'awq')",
    "compressed-tensors": "compressed-tensors folder (quant_method 'compressed-tensors')",
    "gguf": "GGUF file (llama.cpp)",
    "onnx": "ONNX model (QDQ)",
    "qkern-file": "qkern.save file (safetensors with qkern metadata)",
    "float": "float model (no quantization)",
}
COLUMNS = ("layer", "format", "group", "sym", "bits/w", "kernel")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "inspect", help="what a checkpoint holds: formats per layer, bits, kernels, consumers",
        description="Print what a checkpoint holds: its format (qkern / gptq / awq / "
                    "compressed-tensors folder, GGUF file, qkern.save file, ONNX, float), "
                    "every quantized layer's number format, group size, symmetry, bits per "
                    "weight (codes + scales + zero points) and the kernel it will run on "
                    "(the model is built on the CPU with qkern.from_pretrained), the size on "
                    "disk, and which programs can load it.",
        epilog="example: qkern inspect q4-out. Exit status: 0 ok, 1 failure (the checkpoint "
               "does not load), 2 usage (no such file or folder, not a checkpoint).")
    p.add_argument("path", metavar="FILE_OR_DIR", help="model folder, .gguf, .onnx or "
                   "qkern.save (.qk / .safetensors) file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p


def layer_rows(model: nn.Module) -> list[dict]:
    """One row per quantized layer (a module holding a ``weight_q``)."""
    rows = []
    for name, m in model.named_modules():
        q = getattr(m, "weight_q", None)
        if q is None or not hasattr(q, "format"):
            continue
        rows.append({"layer": name, "format": q.format.name, "group": q.group_size,
                     "sym": q.zero_point is None, "bits": q.bits_per_element,
                     "weights": q.layout.numel,
                     "kernel": getattr(m, "kernel", None) or type(m).__name__,
                     "fallback": getattr(m, "kernel_reason", None)})
    return rows


def _file_rows(path: Path) -> tuple[list[dict], dict]:
    """The layer specs a qkern.save file records (the model is not rebuilt: the file holds no
    architecture); bits per weight from the format and the group size (per-channel scales:
    the code bits only)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    specs = json.loads(meta.get("qkern_layers", "{}"))
    config = json.loads(meta.get("qkern_config", "null") or "null")
    rows = []
    for name, s in specs.items():
        fmt = s.get("fmt")
        bits = None
        if fmt:
            F = get_format(fmt)
            g = s.get("group_size")
            bits = float(F.bits)
            if g:
                zbits = 0 if s.get("symmetric", True) else (32 if s.get("float_zero") else F.bits)
                bits += (F.scale_bits + zbits) / g
        rows.append({"layer": name, "format": fmt or s.get("type"), "group": s.get("group_size"),
                     "sym": s.get("symmetric"), "bits": bits, "weights": None,
                     "kernel": s.get("kernel") or s.get("type"), "fallback": None})
    return rows, {"config": config, "qkern_version": meta.get("qkern_version")}


def describe(path: str | Path) -> dict:
    """Everything ``qkern inspect`` prints, as a dict."""
    p = Path(path)
    kind = checkpoint_kind(p)
    info: dict = {"path": str(p), "format": kind, "description": DESCRIPTIONS[kind],
                  "bytes": path_bytes(p),
                  "files": 1 if p.is_file() else sum(1 for f in p.rglob("*") if f.is_file()),
                  "consumers": CONSUMERS[kind], "layers": []}
    if kind == "qkern-file":
        info["layers"], extra = _file_rows(p)
        info.update(extra)
    elif kind not in ("float", "onnx"):
        model = load_any(p, kind)
        info["layers"] = layer_rows(model)
        info["architecture"] = type(model).__name__
        cfg = getattr(model, "config", None)
        qc = getattr(cfg, "quantization_config", None)
        if qc is not None and hasattr(qc, "to_dict"):
            qc = qc.to_dict()
        if isinstance(qc, dict):
            info["config"] = {k: v for k, v in qc.items() if k != "layers"}
        info["float_linears"] = sorted(n for n, m in model.named_modules()
                                       if type(m) is nn.Linear)
    rows = info["layers"]
    sized = [r for r in rows if r["bits"] is not None and r["weights"]]
    if sized:
        n = sum(r["weights"] for r in sized)
        info["mean_bits_per_weight"] = sum(r["bits"] * r["weights"] for r in sized) / n
        info["quantized_weights"] = n
    return info


def table(rows: list[list[str]], header: tuple[str, ...]) -> str:
    """Columns padded to their widest cell, numbers right-aligned."""
    cells = [list(header)] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(r, widths)):
            num = i > 0 and c.replace(".", "", 1).isdigit()
            out.append(c.rjust(w) if num else c.ljust(w))
        return "  ".join(out).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])]
                     + [line(r) for r in rows])


def _text(info: dict) -> str:
    lines = [f"path         {info['path']}",
             f"format       {info['format']}: {info['description']}",
             f"size         {fmt_bytes(info['bytes'])} in {info['files']} file(s)"]
    if "architecture" in info:
        lines.append(f"model        {info['architecture']}")
    rows = info["layers"]
    if rows:
        kinds = sorted({r["kernel"] for r in rows})
        lines.append(f"layers       {len(rows)} quantized; kernels: {', '.join(kinds)}")
    if info.get("float_linears"):
        fl = info["float_linears"]
        lines.append(f"float        {len(fl)} linear(s) kept float: {', '.join(fl[:4])}"
                     + (" ..." if len(fl) > 4 else ""))
    if "mean_bits_per_weight" in info:
        lines.append(f"bits/weight  {info['mean_bits_per_weight']:.3f} over the quantized "
                     f"layers ({info['quantized_weights']} weights)")
    if info["format"] == "float":
        lines.append("quantize     qkern quantize " + info["path"] + " OUT --method gptq")
    lines.append(f"loads in     {', '.join(info['consumers'])}")
    if rows:
        body = [[r["layer"], str(r["format"]),
                 "channel" if r["group"] is None else str(r["group"]),
                 "-" if r["sym"] is None else ("yes" if r["sym"] else "no"),
                 "-" if r["bits"] is None else f"{r['bits']:.3f}",
                 str(r["kernel"]) + (f" ({r['fallback']})" if r["fallback"] else "")]
                for r in rows]
        lines += ["", table(body, COLUMNS)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = describe(args.path)
    print(json.dumps(info, indent=1, default=str) if args.json else _text(info))
    return 0
