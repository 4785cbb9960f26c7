"""The figures of ``qkern report`` (matplotlib, Agg backend), each rendered to PNG bytes.

matplotlib is optional for qkern: it is imported here, inside :func:`pyplot`, and only when a
report is drawn; without it :class:`MissingMatplotlib` says how to install it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import torch

__all__ = ["Grid", "MissingMatplotlib", "Point", "activation_figure", "error_figure",
           "pareto_front", "pareto_figure", "pyplot", "weight_figure"]

DPI = 100


class MissingMatplotlib(RuntimeError):
    """matplotlib is not installed."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingMatplotlib("qkern report draws its plots with matplotlib, which is not "
                                "installed: pip install matplotlib (or pip install "
                                "'qkern[report]')") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


@dataclass
class Grid:
    """One group of one quantized layer: the float weights and the levels the method's grid
    offers them (``(q - z) * s`` for every code q)."""
    values: torch.Tensor
    levels: torch.Tensor


@dataclass
class Point:
    """One method at one setting: its size, quality, time and per-layer errors."""
    method: str
    setting: str
    bits_per_weight: float
    bits_per_byte: float
    seconds: float
    layers: list = field(default_factory=list)  # LayerReport(name, error, seconds, note)
    grids: dict[str, Grid] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} {self.setting}"


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point beats on both size and bits per byte (smaller is better on
    both), by increasing size."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p.bits_per_weight, p.bits_per_byte)):
        if p.bits_per_byte < best:
            front.append(p)
            best = p.bits_per_byte
    return front


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    pyplot().close(fig)
    return buf.getvalue()


def pareto_figure(points: list[Point], fp32_bpb: float, title: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    methods = list(dict.fromkeys(p.method for p in points))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for m in methods:
        ps = [p for p in points if p.method == m]
        ax.scatter([p.bits_per_weight for p in ps], [p.bits_per_byte for p in ps], s=40,
                   color=colors[m], label=m, zorder=3)
    for p in points:
        ax.annotate(p.setting, (p.bits_per_weight, p.bits_per_byte), textcoords="offset points",
                    xytext=(5, 4), fontsize=7, color="0.3")
    front = pareto_front(points)
    if front:
        ax.step([p.bits_per_weight for p in front], [p.bits_per_byte for p in front],
                where="post", color="k", lw=1, ls="--", zorder=2, label="Pareto front")
        ax.scatter([p.bits_per_weight for p in front], [p.bits_per_byte for p in front], s=140,
                   facecolors="none", edgecolors="k", lw=1.2, zorder=4)
    ax.axhline(fp32_bpb, color="0.5", lw=1, label=f"fp32 ({fp32_bpb:.4f}; 32 bits/weight)")
    ax.set_xlabel("bits per weight (quantized linear layers, scales and zero points included)")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _short(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> '3.q_proj'."""
    parts = name.split(".")
    nums = [x for x in parts if x.isdigit()]
    return f"{nums[-1]}.{parts[-1]}" if nums else parts[-1]


def error_figure(points: list[Point]) -> bytes:
    plt = pyplot()
    settings = list(dict.fromkeys(p.setting for p in points))
    fig, axes = plt.subplots(len(settings), 1, figsize=(9, 3.2 * len(settings)),
                             layout="constrained", squeeze=False)
    for ax, s in zip(axes[:, 0], settings):
        names: list[str] = []
        for i, p in enumerate(x for x in points if x.setting == s):
            names = names or [r.name for r in p.layers]
            idx = {n: k for k, n in enumerate(names)}
            xs = [idx[r.name] for r in p.layers if r.name in idx]
            ys = [max(r.error, 1e-12) for r in p.layers if r.name in idx]
            ax.plot(xs, ys, marker="o", ms=3, lw=1, color=f"C{i % 10}", label=p.method)
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=7)
        ax.set_ylabel("relative output error")
        ax.set_title(f"{s}: E||(W - Wq) x||² / E||W x||² per layer (calibration inputs)",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def weight_figure(layers: list[str], weights: dict[str, torch.Tensor],
                  points: list[Point]) -> bytes:
    """Per layer: the histogram of all its weights (top) and of the first group of row 0 with
    each method's grid levels for that group marked (bottom)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 6.2),
                             layout="constrained", squeeze=False)
    for j, name in enumerate(layers):
        w = weights[name].float().flatten()
        ax = axes[0, j]
        ax.hist(w.numpy(), bins=120, color="0.55")
        ax.set_yscale("log")
        ax.set_title(f"{_short(name)} {tuple(weights[name].shape)}: all weights", fontsize=9)
        ax.locator_params(axis="x", nbins=5)
        ax = axes[1, j]
        grids = [(p, p.grids[name]) for p in points if name in p.grids]
        if not grids:
            ax.set_visible(False)
            continue
        vals = grids[0][1].values.float()
        ax.hist(vals.numpy(), bins=40, color="0.75",
                label=f"group weights ({grids[0][0].setting})")
        top = ax.get_ylim()[1]
        for i, (p, g) in enumerate(grids):
            y = top * (1.05 + 0.08 * i)
            lv = g.levels.float().numpy()
            ax.plot(lv, [y] * len(lv), "|", ms=9, mew=1.3, color=f"C{i % 10}", label=p.label)
            ax.plot([lv.min(), lv.max()], [y, y], lw=0.8, color=f"C{i % 10}")
        ax.set_ylim(0, top * (1.15 + 0.08 * len(grids)))
        ax.set_title("row 0, first group: grid levels (|) per method", fontsize=9)
        ax.locator_params(axis="x", nbins=5)
        if j == len(layers) - 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _png(fig)


def activation_figure(acts: dict[str, torch.Tensor]) -> bytes:
    """Histogram of each layer's inputs with the per-tensor symmetric int8 range
    (absmax / 127 steps) marked."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(acts), figsize=(4.2 * len(acts), 3.4),
                             layout="constrained", squeeze=False)
    for ax, (name, x) in zip(axes[0], acts.items()):
        x = x.float().flatten()
        amax = float(x.abs().max())
        step = amax / 127 if amax > 0 else 1.0
        zero = float((x.abs() < step / 2).float().mean())
        ax.hist(x.numpy(), bins=150, color="C0", alpha=0.8)
        ax.set_yscale("log")
        for v in (-amax, amax):
            ax.axvline(v, color="C3", lw=1)
        ax.axvspan(-step / 2, step / 2, color="C1", alpha=0.3)
        ax.set_title(f"{_short(name)} input: int8 range ±{amax:.3g} (red),\nstep {step:.3g}: "
                     f"{100 * zero:.1f}% round to 0 (orange)", fontsize=9)
        ax.set_xlabel("activation value")
    return _png(fig)
