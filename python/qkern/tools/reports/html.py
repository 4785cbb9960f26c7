"""``qkern report``: quantize a byte-level Llama with several methods and settings and write a
self-contained HTML report (PNG plots embedded as base64) and a Markdown twin (PNGs in
``<name>_files/``): size vs quality (Pareto chart), per-layer error, weight histograms with
each method's grid, activation histograms with the int8 range, and a table of the numbers.

Calibration and evaluation are those of :mod:`qkern.tools.reports.llm` (WikiText-2 valid
windows of 256 bytes to calibrate, bits per byte on the first windows of WikiText-2 test).
Also ``python -m qkern.tools.reports.html``. docs/report.md describes the report.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import set_num_threads
from ...io.safetensors import atomic_write
from ...models import bits_per_byte, load_llama
from ...models.assets import ModelNotFoundError, shipped_path
from ...nn import QuantLinear
from ...quantization import text_calibration
from ...version import __version__
from . import llm, plots
from .plots import Grid, MissingMatplotlib, Point

__all__ = ["ALIASES", "Figure", "ReportData", "UsageError", "bits_per_weight", "build", "main",
           "parse_methods", "parse_settings", "render_html", "render_markdown", "write"]

PROG = "qkern report"
SEQLEN = 256
#: command-line method names -> the method labels of qkern.tools.reports.llm.METHODS
ALIASES = {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "awq+gptq": "AWQ + GPTQ", "hqq": "HQQ",
           "omniquant": "OmniQuant (LWC; 2 epochs)", "rotation+gptq": "rotation + GPTQ"}
DEFAULT_METHODS = "rtn,gptq,awq,hqq"
DEFAULT_SETTINGS = "w4 g128,w3 g128,w2 g64"


class UsageError(ValueError):
    """A bad command line (exit status 2)."""


def parse_methods(text: str) -> list[str]:
    out = []
    for m in (x.strip() for x in text.split(",")):
        if not m:
            continue
        label = ALIASES.get(m.lower(), m if m in llm.METHODS else None)
        if label is None:
            raise UsageError(f"unknown method {m!r}; choose from {', '.join(ALIASES)}")
        out.append(label)
    if not out:
        raise UsageError("--methods is empty")
    return list(dict.fromkeys(out))


_SETTING = re.compile(r"w(\d)\s*(?:g(\d+)|(per-channel|pc))")


def parse_settings(text: str) -> dict[str, tuple[int, int | None]]:
    """'w4 g128,w3 per-channel' -> {'w4 g128': (4, 128), 'w3 per-channel': (3, None)}."""
    out: dict[str, tuple[int, int | None]] = {}
    for s in (x.strip().lower() for x in text.split(",")):
        if not s:
            continue
        m = _SETTING.fullmatch(s)
        if m is None or not 2 <= int(m.group(1)) <= 8 or (m.group(2) and int(m.group(2)) < 1):
            raise UsageError(f"bad setting {s!r}: write w<bits 2..8> g<group size> or "
                             "w<bits> per-channel, e.g. 'w4 g128'")
        bits, group = int(m.group(1)), (int(m.group(2)) if m.group(2) else None)
        out[f"w{bits} " + (f"g{group}" if group else "per-channel")] = (bits, group)
    if not out:
        raise UsageError("--settings is empty")
    return out


def bits_per_weight(model: torch.nn.Module) -> float:
    """Mean stored bits per weight over the model's QuantLinear layers (codes, scales and zero
    points: QTensor.bits_per_element weighted by the layer's size)."""
    bits, n = 0.0, 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            k = mod.in_features * mod.out_features
            bits += mod.weight_q.bits_per_element * k
            n += k
    if n == 0:
        raise ValueError("the quantized model holds no QuantLinear layer")
    return bits / n


def _group_grid(layer: QuantLinear, w: torch.Tensor) -> Grid:
    """Row 0's first group of ``w`` (the float weight) and the levels of ``layer``'s grid
    there."""
    qt = layer.quantized_weight()
    fmt, g = qt.format, qt.group_size or w.shape[1]
    s = float(qt.scale.reshape(w.shape[0], -1)[0, 0])
    if fmt.kind == "int":
        q = torch.arange(fmt.qmin, fmt.qmax + 1, dtype=torch.float32)
        z = 0.0 if qt.zero_point is None else float(qt.zero_point.reshape(w.shape[0], -1)[0, 0])
        levels = (q - z) * s
    else:
        levels = fmt.codebook * s
    return Grid(w[0, :g].clone(), levels)


def _progress(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Figure:
    name: str  # file stem
    title: str
    caption: str
    png: bytes


@dataclass
class ReportData:
    model: str
    n_cal: int
    n_eval: int
    fp32_bpb: float
    points: list[Point]
    skipped: list[str]
    figures: list[Figure]
    seconds: float


def _pick_layers(names: list[str], k: int) -> list[str]:
    if not names:
        return []
    idx = sorted({0, len(names) - 1, len(names) // 2} if k >= 3 else {0, len(names) - 1})
    return [names[i] for i in idx][:k]


def build(model_dir: str | Path, methods: list[str], settings: dict[str, tuple[int, int | None]],
          n_cal: int = 64, n_eval: int = 48, n_hist: int = 3) -> ReportData:
    """Quantizes the model with every method x setting and draws the figures."""
    t0 = time.perf_counter()
    plots.pyplot()  # fail before the long part when matplotlib is missing
    model = load_llama(model_dir)
    if model.config.vocab_size < 256:
        raise UsageError(f"{model_dir}: vocab_size {model.config.vocab_size} < 256: the report "
                         "measures bits per byte and needs a byte-level model")
    valid, test = llm.wikitext_bytes()
    cal = text_calibration(valid, "bytes", n_cal, SEQLEN)
    with torch.no_grad():
        fp = bits_per_byte(model, test, window=SEQLEN, n_windows=n_eval)
    _progress(t0, f"fp32: {fp:.4f} bits per byte on {n_eval} x {SEQLEN} bytes of WikiText-2 "
                  "test")
    points, skipped = [], []
    runs = [(m, s) for m in methods for s in settings]
    for i, (m, s) in enumerate(runs, 1):
        cfg = llm.METHODS[m](*settings[s])
        if cfg is None:
            skipped.append(f"{m} {s}: method not available in this build")
            _progress(t0, f"[{i}/{len(runs)}] {m} {s}: not available, skipped")
            continue
        _progress(t0, f"[{i}/{len(runs)}] {m} {s}: quantizing ({n_cal} x {SEQLEN} bytes)")
        src = llm.prepare(m, model)
        q, secs = llm.quantize(src, cfg, cal)
        with torch.no_grad():
            bpb = bits_per_byte(q, test, window=SEQLEN, n_windows=n_eval)
        p = Point(m, s, bits_per_weight(q), bpb, secs, list(getattr(q, "qkern_report", [])))
        names = [r.name for r in p.layers]
        for name in _pick_layers(names, n_hist):
            layer = q.get_submodule(name)
            if isinstance(layer, QuantLinear):
                w = src.get_submodule(name).weight.detach().float()
                p.grids[name] = _group_grid(layer, w)
        points.append(p)
        _progress(t0, f"[{i}/{len(runs)}] {m} {s}: {secs:.1f} s, {p.bits_per_weight:.3f} bits "
                      f"per weight, {bpb:.4f} bits per byte")
    if not points:
        raise RuntimeError("no method/setting could be run: " + "; ".join(skipped))
    _progress(t0, "drawing the figures")
    layers = [n for n in points[0].grids]
    weights = {n: model.get_submodule(n).weight.detach() for n in layers}
    acts = _activations(model, layers, cal[:4])
    name = Path(model_dir).name
    figs = [
        Figure("pareto", "Size vs quality",
               "Bits per weight of the quantized linear layers (codes + scales + zero points) "
               "against bits per byte on WikiText-2 test, one point per method and setting; "
               "circled: the Pareto front (no other point is both smaller and better); grey "
               "line: the fp32 model.",
               plots.pareto_figure(points, fp, f"{name}: size vs quality")),
        Figure("layer_error", "Per-layer error",
               "Relative output error of each quantized linear layer on its calibration "
               "inputs, as the pipeline measured it while quantizing (log scale).",
               plots.error_figure(points)),
        Figure("weights", "Weights and grids",
               "Top: every weight of a layer (log counts). Bottom: the first group of row 0 of "
               "that layer and the levels each method's grid offers it (one row of | marks per "
               "method; the line spans the group's range).",
               plots.weight_figure(layers, weights, points)),
        Figure("activations", "Activations",
               "Inputs of the same layers in the fp32 model on calibration text (forward hooks), "
               "with the per-tensor symmetric int8 range (absmax, red) and the band that rounds "
               "to zero at that step (orange).",
               plots.activation_figure(acts)),
    ]
    return ReportData(str(model_dir), n_cal, n_eval, fp, points, skipped, figs,
                      time.perf_counter() - t0)


def _activations(model: torch.nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: got[n].append(args[0].detach().reshape(-1))) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def _rows(d: ReportData) -> list[list[str]]:
    rows = [["fp32", "-", "32.000", f"{d.fp32_bpb:.4f}", "+0.0000", "-", "-", "-"]]
    for p in d.points:
        errs = [r.error for r in p.layers]
        rows.append([p.method, p.setting, f"{p.bits_per_weight:.3f}", f"{p.bits_per_byte:.4f}",
                     f"{p.bits_per_byte - d.fp32_bpb:+.4f}",
                     f"{sum(errs) / len(errs):.3g}" if errs else "-",
                     f"{max(errs):.3g}" if errs else "-", f"{p.seconds:.1f}"])
    return rows


HEADER = ["method", "setting", "bits/weight", "bits/byte", "Δ vs fp32", "mean layer error",
          "max layer error", "seconds"]


def _summary(d: ReportData) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    return (f"Model {d.model}; calibration {d.n_cal} x {SEQLEN} bytes of WikiText-2 valid; "
            f"bits per byte on the first {d.n_eval} x {SEQLEN} bytes of WikiText-2 test; "
            f"qkern {__version__}, {now} UTC, {d.seconds:.0f} s.")


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,td:nth-child(2){text-align:left}"
        "img{max-width:100%}figcaption{color:#555;font-size:90%}")


def render_html(d: ReportData) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>qkern report: {e(Path(d.model).name)}</title><style>{_CSS}</style>",
           "</head><body>", f"<h1>qkern report: {e(Path(d.model).name)}</h1>",
           f"<p>{e(_summary(d))}</p>", "<h2>Numbers</h2>", '<table id="numbers"><thead><tr>']
    out += [f"<th>{e(h)}</th>" for h in HEADER] + ["</tr></thead><tbody>"]
    for row in _rows(d):
        out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    out += [f"<p>Skipped: {e(s)}</p>" for s in d.skipped]
    for f in d.figures:
        b64 = base64.b64encode(f.png).decode("ascii")
        out += [f'<h2 id="{f.name}">{e(f.title)}</h2>', "<figure>",
                f'<img src="data:image/png;base64,{b64}" alt="{e(f.title)}">',
                f"<figcaption>{e(f.caption)}</figcaption></figure>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_markdown(d: ReportData, files_dir: str) -> str:
    out = [f"# qkern report: {Path(d.model).name}", "", _summary(d), "", "## Numbers", "",
           "| " + " | ".join(HEADER) + " |", "|---|---|" + "--:|" * (len(HEADER) - 2)]
    out += ["| " + " | ".join(r) + " |" for r in _rows(d)]
    out += [""] + [f"Skipped: {s}" for s in d.skipped]
    for f in d.figures:
        out += [f"## {f.title}", "", f"![{f.title}]({files_dir}/{f.name}.png)", "", f.caption,
                ""]
    return "\n".join(out)


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=True)


def write(d: ReportData, out: str | Path) -> list[Path]:
    """Writes ``out`` (HTML), ``out`` with suffix .md and its PNGs in ``<stem>_files/``, each
    file atomically (replacing an earlier report); returns the paths written."""
    out = Path(out)
    files = out.parent / f"{out.stem}_files"
    files.mkdir(exist_ok=True)
    written = []
    for f in d.figures:
        _write_bytes(files / f"{f.name}.png", f.png)
        written.append(files / f"{f.name}.png")
    md = out.with_suffix(".md")
    _write_bytes(md, render_markdown(d, files.name).encode())
    _write_bytes(out, render_html(d).encode())
    return [out, md, *written]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Quantize a byte-level Llama (default: the shipped wikitext-bytelm) with "
                    "each method at each setting, measure bits per byte on WikiText-2 test, and "
                    "write a self-contained HTML report (plots embedded) plus a Markdown copy "
                    "(OUT with suffix .md, PNGs in <OUT stem>_files/). Needs matplotlib.",
        epilog="Exit status: 0 report written; 1 failure (matplotlib missing, a method failed, "
               "the report could not be written); 2 usage error (unknown method, bad setting, "
               "missing model folder or output folder, a model that is not byte-level). "
               "Progress goes to stderr; the paths written go to stdout.")
    p.add_argument("--model", metavar="DIR",
                   help="Llama model folder (config.json + model.safetensors) with a byte-level "
                        "vocabulary (>= 256); default: the shipped models/wikitext-bytelm")
    p.add_argument("--methods", metavar="LIST",
                   help=f"comma-separated, from: {', '.join(ALIASES)} (default: "
                        f"{DEFAULT_METHODS}; with --quick: rtn)")
    p.add_argument("--settings", metavar="LIST",
                   help="comma-separated weight settings w<bits> g<group> or w<bits> "
                        f"per-channel (default: '{DEFAULT_SETTINGS}'; with --quick: 'w4 g128')")
    p.add_argument("--out", metavar="FILE", default="report.html",
                   help="HTML file to write (default: report.html); replaced if it exists")
    p.add_argument("--samples", type=int, metavar="N",
                   help=f"calibration windows of {SEQLEN} bytes (default 64; --quick: 4)")
    p.add_argument("--eval-windows", type=int, metavar="N",
                   help=f"WikiText-2 test windows of {SEQLEN} bytes for bits per byte "
                        "(default 48; --quick: 8)")
    p.add_argument("--quick", action="store_true",
                   help="a small report in well under a minute: RTN at w4 g128 (unless "
                        "--methods/--settings say otherwise), 4 calibration and 8 eval windows, "
                        "2 histogram layers")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="CPU threads (default 2)")
    return p


def _check_args(a: argparse.Namespace):
    methods = parse_methods(a.methods or ("rtn" if a.quick else DEFAULT_METHODS))
    settings = parse_settings(a.settings or ("w4 g128" if a.quick else DEFAULT_SETTINGS))
    for name, v in (("--samples", a.samples), ("--eval-windows", a.eval_windows),
                    ("--threads", a.threads)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    model = Path(a.model) if a.model else shipped_path("models/wikitext-bytelm")
    if not model.is_dir() or not (model / "config.json").is_file():
        raise UsageError(f"model folder {model} not found (it needs config.json and "
                         "model.safetensors)")
    out = Path(a.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {out}: give an .html file name")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    return methods, settings, model, out


def main(argv: Sequence[str] | None = None) -> int:
    """``qkern report``; returns the exit status."""
    p = _parser()
    try:
        a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or an argparse usage error (2)
        return int(e.code or 0)
    try:
        methods, settings, model, out = _check_args(a)
    except (UsageError, ModelNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    n_cal = a.samples or (4 if a.quick else 64)
    n_eval = a.eval_windows or (8 if a.quick else 48)
    try:
        d = build(model, methods, settings, n_cal, n_eval, n_hist=2 if a.quick else 3)
        paths = write(d, out)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except MissingMatplotlib as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError, OSError) as e:
        print(f"{PROG}: error: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    for path in paths[:2]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
