"""``qkern demo``: quantize a real model's weights to every format and show what it costs.

The demo loads a small real checkpoint (by default Karpathy's stories260K, shipped in the
repository under ``models/stories260k`` and found by :func:`qkern.models.assets.find_model`),
quantizes each of its 2-D weight matrices with
:func:`qkern.quantize` for every scheme in :data:`DEFAULT_SPECS` and prints one Markdown table:
bits per weight, SQNR, relative error and max abs error, sorted by bits per weight.

The demo is a list of sections (:data:`SECTIONS`) run in order over one :class:`DemoContext`;
a later feature adds a :class:`Section` to that list. The pieces are usable on their own::

    model = load_model()                      # or load_model("path/to/dir")
    results = evaluate_weights(model, DEFAULT_SPECS)
    print(format_weight_table(model, results))
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

import qkern

from .. import formats as F
from ..io import read_safetensors
from ..models.assets import MODEL_ENV, ModelNotFoundError, find_model
from ..models.llama import read_weights
from ..quantize import quantize
from ..tensor import QTensor
from .bench.decode import SCHEMES as DECODE_SCHEMES
from .bench.decode import run_decode
from .reports import digits, llm, minilm

__all__ = [  # noqa: RUF022 (in reading order)
    "Spec", "DEFAULT_SPECS", "select_specs", "Model", "load_model", "weight_matrices",
    "quantize_matrix",
    "WeightResult", "evaluate_weights", "format_weight_table", "DemoContext", "Section",
    "SECTIONS", "run",
]


# --------------------------------------------------------------------------------------------
# What to quantize to


@dataclass(frozen=True)
class Spec:
    """One quantization scheme of the demo: a format plus how its scales are laid out.

    ``granularity`` is "tensor", "channel" (one scale per output row, axis 0 of a
    ``(out, in)`` weight) or "group" (``group_size`` consecutive weights along the input dim;
    see :func:`quantize_matrix` for matrices whose input dim it does not divide)."""

    key: str  # what --formats accepts
    format: str
    granularity: str
    group_size: int | None = None
    symmetric: bool = True
    double_quant: bool = False

    @property
    def fmt(self) -> F.Format:
        return F.get(self.format)

    @property
    def block(self) -> int | None:
        """The group size actually used (the format's default block when not given)."""
        if self.granularity != "group":
            return None
        return self.group_size or self.fmt.block_size

    def describe(self) -> str:
        if self.granularity == "tensor":
            s = "per-tensor"
        elif self.granularity == "channel":
            s = "per-channel (row)"
        else:
            s = f"group {self.block}"
        extras = []
        if not self.symmetric:
            extras.append("asymmetric")
        if self.double_quant:
            extras.append("double-quant scales")
        if self.fmt.scale_bits == 8:
            extras.append("E8M0 scales")
        return ", ".join([s, *extras])


DEFAULT_SPECS: tuple[Spec, ...] = (
    Spec("int8-ch", "int8", "channel"),
    Spec("int4-ch", "int4", "channel"),
    Spec("int4-g32", "int4", "group", 32),
    Spec("int4-g32-asym", "int4", "group", 32, symmetric=False),
    Spec("int3-g32", "int3", "group", 32),
    Spec("int2-g32-asym", "int2", "group", 32, symmetric=False),
    Spec("nf4-b64", "nf4", "group", 64),
    Spec("nf4-b64-dq", "nf4", "group", 64, double_quant=True),
    Spec("fp4_e2m1-b64", "fp4_e2m1", "group", 64),
    Spec("fp4_bnb-b64", "fp4_bnb", "group", 64),
    Spec("fp8_e4m3-tensor", "fp8_e4m3", "tensor"),
    Spec("fp8_e5m2-tensor", "fp8_e5m2", "tensor"),
    Spec("mxfp4", "mxfp4", "group", 32),
    Spec("mxfp8_e4m3", "mxfp8_e4m3", "group", 32),
    Spec("mxint8", "mxint8", "group", 32),
    Spec("log2_4-ch", "log2_4", "channel"),
    Spec("ternary-ch", "ternary", "channel"),
    Spec("binary-ch", "binary", "channel"),
    Spec("mulaw-ch", "mulaw", "channel"),
    Spec("alaw-ch", "alaw", "channel"),
)


def _default_spec(name: str) -> Spec:
    """A scheme for any registry format the defaults do not cover: its own block for block
    formats, per-channel otherwise; asymmetric (min/max) for unsigned integers and int1,
    which have no symmetric grid around zero."""
    fmt = F.get(name)
    sym = not (fmt.kind == "int" and not fmt.symmetric_only and (not fmt.signed or fmt.bits == 1))
    if fmt.block_size is not None:
        return Spec(name, name, "group", fmt.block_size, symmetric=sym)
    return Spec(name, name, "channel", symmetric=sym)


def select_specs(names: Iterable[str] | str | None,
                 specs: Sequence[Spec] = DEFAULT_SPECS) -> list[Spec]:
    """The schemes named by ``names`` (a list or a comma-separated string). A name is a
    scheme key ("int4-g32-asym"), a format name ("int4": every default scheme of that format)
    or any other registry format (quantized per-channel, or in its own blocks)."""
    if names is None:
        return list(specs)
    if isinstance(names, str):
        names = names.split(",")
    out: list[Spec] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        hits = [s for s in specs if s.key == name] or [s for s in specs if s.format == name]
        if not hits:
            if name not in F.names():
                raise ValueError(
                    f"unknown format or scheme {name!r}; schemes: "
                    f"{', '.join(s.key for s in specs)}; or any format of `qkern formats`"
                )
            hits = [_default_spec(name)]
        out.extend(h for h in hits if h not in out)
    if not out:
        raise ValueError("no formats selected")
    return out


# --------------------------------------------------------------------------------------------
# The model


@dataclass
class Model:
    name: str
    path: Path  # the directory (or the .safetensors file when given one alone)
    tensors: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def describe(self) -> str:
        arch = ", ".join(self.config.get("architectures", [])) or "safetensors"
        return f"{self.name} ({arch}, {self.n_params:,} parameters)"


def load_model(path: str | os.PathLike | None = None) -> Model:
    """Find (see :func:`qkern.models.assets.find_model`) and load a model's tensors and config."""
    p = find_model(path)
    cfg_path = (p.parent if p.is_file() else p) / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    name = p.stem if p.is_file() else p.name
    return Model(name, p, read_safetensors(p) if p.is_file() else read_weights(p), config)


def weight_matrices(model: Model) -> dict[str, torch.Tensor]:
    """Every floating-point 2-D tensor (linear weights, embeddings), as float32; norms, biases
    and other 1-D tensors stay in full precision and are not counted."""
    tensors = model.tensors.items()
    return {k: t.float() for k, t in tensors if t.dim() == 2 and t.is_floating_point()}


# --------------------------------------------------------------------------------------------
# Quantize and measure


def quantize_matrix(w: torch.Tensor, spec: Spec) -> tuple[QTensor, str]:
    """Quantize one ``(out, in)`` weight matrix; returns the QTensor and where its scales run:
    "tensor", "row" (per output channel), "in" (groups along the input dim, the usual
    choice) or "out" (groups along the output dim, used only when the group size does not
    divide the input dim but divides the output dim, e.g. stories260K's 64x172 down_proj).
    A matrix neither dim of which the group size divides is quantized per-channel ("row")."""
    kw = {"symmetric": spec.symmetric, "double_quant": spec.double_quant}
    if spec.granularity == "tensor":
        return quantize(w, spec.format, granularity="tensor", **kw), "tensor"
    if spec.granularity == "channel":
        return quantize(w, spec.format, granularity="channel", axis=0, **kw), "row"
    g = spec.block
    for axis, where in ((1, "in"), (0, "out")):
        if w.shape[axis] % g == 0:
            return quantize(w, spec.format, granularity="group", axis=axis, group_size=g,
                            **kw), where
    return quantize(w, spec.format, granularity="channel", axis=0, **kw), "row"


@dataclass
class WeightResult:
    """One scheme over all weight matrices of a model."""

    spec: Spec
    n_weights: int
    n_matrices: int
    nbytes: int
    sqnr_db: float
    rel_error: float
    max_abs_error: float
    placement: dict[str, str]  # matrix name -> "tensor" | "row" | "in" | "out"
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_weights

    @property
    def unusual(self) -> dict[str, str]:
        """Matrices whose scales do not run the way ``spec`` asks (group fallbacks)."""
        want = {"tensor": "tensor", "channel": "row", "group": "in"}[self.spec.granularity]
        return {k: v for k, v in self.placement.items() if v != want}

    def granularity(self) -> str:
        s = self.spec.describe()
        if self.spec.granularity == "group":
            mark = "†" if self.unusual else ""
            s = s.replace(f"group {self.spec.block}", f"group {self.spec.block} along in{mark}", 1)
        return s


def evaluate_weights(model: Model, specs: Sequence[Spec] = DEFAULT_SPECS) -> list[WeightResult]:
    """Quantize + dequantize every weight matrix of ``model`` with each scheme; error sums in
    float64 over all weights: SQNR = 10 log10(sum x^2 / sum (x - x')^2),
    relative error = ||x - x'|| / ||x||, bits/weight = 8 * sum(nbytes) / weights."""
    mats = weight_matrices(model)
    if not mats:
        raise ValueError(f"{model.name}: no 2-D floating-point weights to quantize")
    sig = sum(float(w.double().square().sum()) for w in mats.values())
    n = sum(w.numel() for w in mats.values())
    results = []
    for spec in specs:
        t0 = time.perf_counter()
        noise, max_err, nbytes, placement = 0.0, 0.0, 0, {}
        for name, w in mats.items():
            qt, placement[name] = quantize_matrix(w, spec)
            err = qt.dequantize(torch.float32).double() - w.double()
            noise += float(err.square().sum())
            max_err = max(max_err, float(err.abs().max()))
            nbytes += qt.nbytes
        sqnr = math.inf if noise == 0 else 10.0 * math.log10(sig / noise)
        rel = math.sqrt(noise / sig) if sig else math.nan
        results.append(WeightResult(spec, n, len(mats), nbytes, sqnr, rel, max_err, placement,
                                    time.perf_counter() - t0))
    return results


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def format_weight_table(model: Model, results: Sequence[WeightResult],
                        seconds: float | None = None) -> str:
    """The Markdown table of :func:`evaluate_weights`' results, sorted by bits per weight."""
    mats = weight_matrices(model)
    took = sum(r.seconds for r in results) if seconds is None else seconds
    n = results[0].n_weights if results else sum(w.numel() for w in mats.values())
    plural = "scheme" if len(results) == 1 else "schemes"
    lines = [
        (f"## Weight quantization of {model.describe()} · qkern {qkern.__version__}, "
         f"ISA {qkern.get_isa()}, {qkern.get_num_threads()} threads · {took:.2f} s"),
        "",
        (f"{len(mats)} weight matrices ({n:,} weights) x {len(results)} {plural}; 1-D tensors "
         f"(norms) stay fp32 and are not counted."),
        "",
        "| scheme | format | granularity | bits/weight | SQNR (dB) | rel. error | max abs err |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for r in sorted(results, key=lambda r: (r.bits_per_weight, -r.sqnr_db)):
        lines.append(
            f"| {r.spec.key} | {r.spec.format} | {r.granularity()} | {r.bits_per_weight:.3f} "
            f"| {r.sqnr_db:.2f} | {100 * r.rel_error:.2f} % | {r.max_abs_error:.4f} |"
        )
    lines += ["", (f"bits/weight counts codes, scales (fp32; E8M0 for MX), zero points and "
                   f"double-quant metadata; SQNR = 10 log10(sum x^2 / sum (x - x')^2) and "
                   f"rel. error = ||x - x'|| / ||x|| over all {n:,} weights.")]
    # one footnote per set of matrices that fell back the same way, naming the group sizes
    notes: dict[tuple[tuple[str, ...], str], list[int]] = {}
    for r in results:
        by_where: dict[str, list[str]] = {}
        for name, where in r.unusual.items():
            by_where.setdefault(where, []).append(name)
        for where, names in by_where.items():
            sizes = notes.setdefault((tuple(names), where), [])
            if r.spec.block not in sizes:
                sizes.append(r.spec.block)
    for (names, where), sizes in notes.items():
        shapes = sorted({_shape(mats[n]) for n in names})
        how = "run along the output dim" if where == "out" else "fall back to per-channel"
        lines.append(
            f"† {len(names)} of {len(mats)} matrices ({', '.join(_short_names(list(names)))}, "
            f"{', '.join(shapes)}) have an input dim that is not a multiple of the group size "
            f"({' or '.join(map(str, sorted(sizes)))}): their groups {how} instead."
        )
    return "\n".join(lines)


def _short_names(names: list[str]) -> list[str]:
    """'model.layers.{0..4}.mlp.down_proj.weight' -> one entry per distinct suffix."""
    out: list[str] = []
    for n in names:
        parts = [p for p in n.split(".") if not p.isdigit() and p not in ("model", "layers")]
        s = ".".join(p for p in parts if p != "weight") or n
        if s not in out:
            out.append(s)
    return out


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class DemoContext:
    """What the sections share: the model, the schemes, where to print and what earlier
    sections computed (``results[section.name]``)."""

    model: Model | None  # None when no section needs the weight-table model
    specs: list[Spec]
    out: TextIO
    results: dict[str, object] = field(default_factory=dict)
    #: "section: reason" for every section that could not run (a file or package missing)
    skipped: list[str] = field(default_factory=list)

    def skip(self, section: str, title: str, reason: Exception) -> str:
        self.skipped.append(f"{section}: {reason}")
        return f"{title}\n\nskipped: {reason}"


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[DemoContext], str]  # returns Markdown to print


def _weights_section(ctx: DemoContext) -> str:
    if ctx.model is None:  # the default model is not there (run() noted why)
        return ""
    t0 = time.perf_counter()
    results = evaluate_weights(ctx.model, ctx.specs)
    ctx.results["weights"] = results
    return format_weight_table(ctx.model, results, time.perf_counter() - t0)


def _decode_section(ctx: DemoContext) -> str:
    keep = ("fp32", "torch dynamic", "qkern W8A8", "qkern int4 g32 fast", "qkern nf4",
            "qkern int3")
    schemes = [s for s in DECODE_SCHEMES if s[0].startswith(keep)]
    title = "## Byte-level Llama (wikitext-bytelm): quality and decode speed"
    try:
        body = run_decode(threads=max(1, min(2, os.cpu_count() or 1)), repeats=3, n_tokens=64,
                          windows=48, schemes=schemes)
    except FileNotFoundError as e:
        return ctx.skip("decode", title, e)
    return title + "\n\n" + load_caveat() + "\n\n" + body


def load_caveat() -> str:
    """The machine's load when the speeds were measured, and whether they can be trusted."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "Load average unknown: speed figures may be disturbed by other work."
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        return (f"**Speed figures unreliable**: load average {load:.1f} on {cpus} CPUs while "
                "measuring (other processes share the cores; tokens/s can swing 10x). Quality "
                "columns are exact.")
    return f"Measured at load average {load:.1f} on {cpus} CPUs."


def _digits_section(ctx: DemoContext) -> str:
    title = "## PTQ of an MLP and a CNN on real images"
    try:
        body = digits.run()
    except ImportError as e:  # scikit-learn (the [demo] extra) missing
        return ctx.skip("digits", title, e)
    return title + "\n\n" + body


def _minilm_section(ctx: DemoContext) -> str:
    try:
        body = minilm.run()
    except (ImportError, FileNotFoundError) as e:  # tokenizers or the model package missing
        return ctx.skip("minilm", "## all-MiniLM-L6-v2", e)
    return "## all-MiniLM-L6-v2 sentence embeddings, quantized\n\n" + body


def _llm_section(ctx: DemoContext) -> str:
    title = "## LLM post-training quantization (wikitext-bytelm, block by block)"
    try:
        body = llm.bytelm_table(["RTN", "GPTQ", "AWQ", "HQQ"], ["w4 g128", "w3 g128"], n_cal=32)
    except FileNotFoundError as e:
        return ctx.skip("llm", title, e)
    return title + "\n\n" + body + "\n\nThe full table: python -m qkern.tools.reports.llm"


SECTIONS: list[Section] = [
    Section("weights", _weights_section),
    Section("decode", _decode_section),
    Section("llm", _llm_section),
    Section("digits", _digits_section),
    Section("minilm", _minilm_section),
]


def run(model: str | os.PathLike | Model | None = None, formats: Iterable[str] | str | None = None,
        out: TextIO | None = None, sections: Sequence[Section] | None = None) -> DemoContext:
    """Run the demo's sections in order, printing each; returns the context (with results)."""
    out = sys.stdout if out is None else out
    sections = SECTIONS if sections is None else sections
    needs_model = any(s.name == "weights" for s in sections) or model is not None
    m, missing = None, None
    if isinstance(model, Model):
        m = model
    elif needs_model:
        try:
            m = load_model(model)
        except ModelNotFoundError as e:
            if model is not None or os.environ.get(MODEL_ENV):  # the user's path: a usage error
                raise
            missing = e  # the shipped default is not there: skipped like the other sections
    ctx = DemoContext(m, select_specs(formats), out)
    if missing is not None:
        out.write(ctx.skip("weights", "## Weight formats", missing) + "\n")
    for i, section in enumerate(sections):
        text = section.run(ctx)
        if text:
            out.write(("\n" if i else "") + text.rstrip("\n") + "\n")
            out.flush()
    return ctx
