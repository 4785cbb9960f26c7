"""Mixed precision on models/wikitext-bytelm: the bits-vs-quality Pareto table of
docs/mixed_precision.md.

``python -m qkern.tools.reports.mixed_precision [--budgets 2.5,3,3.5,4.5] [--methods
hutchinson,kl] [--plot docs/images/mixed_precision.png]``

RTN (or ``--algo gptq``: GPTQ on 64 windows) at the llm report's settings (group 64,
asymmetric; int8 symmetric per channel, its fused kernel's layout; the bytelm's down_proj,
input 672, is stored per output channel, as the pipeline notes). Sensitivities on
``--n-cal`` windows x 256 bytes of WikiText-2 *valid*; each budget's allocation (exact
knapsack over {2, 3, 4, 8, float16}) is verified by
:func:`qkern.mixed_choice.choose_allocation` (the knapsack, the knapsack 0.025 / 0.05 / 0.1
bits lower, every uniform allocation that fits: the lowest loss on the same calibration
windows wins), then quantized with ``quantize_model`` and scored in bits per byte on
WikiText-2 *test* (48 x 256 bytes, as the llm report), next to the unverified knapsack.
Average bits per weight over the 28 block linears are measured on the built layers
(``weight_q.bits_per_element``: codes, scales, zero points; float layers at 16). Budgets
``u2``, ``u3``, ``u4`` stand for the uniform allocations' own averages, so mixed and uniform
meet at equal bits there.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ... import GPTQConfig, RTNConfig, set_num_threads
from ... import mixed_precision as mp
from ...mixed_choice import allocation_key, candidate_allocations, choose_allocation, measure_loss
from ...models import bits_per_byte, load_llama
from ...models.assets import shipped_path
from ...quantization import quantize_model, text_calibration
from .llm import wikitext_bytes
from .plots import pyplot

__all__ = ["CONFIGS", "main", "measured_bits", "pareto_table", "plot"]

#: the llm report's settings at g64 (asymmetric), by ``--algo``
CONFIGS = {"rtn": RTNConfig(bits=4, group_size=64, sym=False),
           "gptq": GPTQConfig(bits=4, group_size=64, sym=False)}
UNIFORM = (2, 3, 4, 8)
_STYLE = {"uniform": "--", "knapsack": ":"}


def measured_bits(model: nn.Module, layers: list[str], float_bits: int = 16) -> float:
    """Average bits per weight of ``layers`` in the quantized ``model`` (the built layers'
    storage; a layer left float counts ``float_bits``)."""
    tot = n = 0.0
    for name in layers:
        m = model.get_submodule(name)
        q = getattr(m, "weight_q", None)
        k = m.in_features * m.out_features
        tot += k * (float_bits if q is None else q.bits_per_element)
        n += k
    return tot / n


def _score(model, cfg, test, cal) -> tuple[nn.Module, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_model(model, cfg, cal, progress=False)
    with torch.no_grad():
        return q, bits_per_byte(q, test)


def pareto_table(budgets: list[str], methods: list[str], n_cal: int = 16, n_probes: int = 4,
                 algo: str = "rtn", progress: bool = False,
                 choices: tuple = (2, 3, 4, 8, None), below: tuple = (0.025, 0.05, 0.1),
                 quant_cal: int = 64) -> tuple[str, dict]:
    """(Markdown, the points {curve label: [(avg bits, bits per byte)]}). ``choices``: the
    per-layer bits (None = float16); ``below``: the knapsack's lower budgets tried;
    ``quant_cal``: GPTQ's calibration windows. Each distinct allocation is quantized once:
    its calibration loss (``choose_allocation``'s cache) and test bits per byte together."""
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    valid, test = wikitext_bytes()
    cal = text_calibration(valid, "bytes", n_cal, 256)
    config = CONFIGS[algo]
    # GPTQ calibrates on quant_cal windows (the llm report's 64); RTN needs none
    qcal = text_calibration(valid, "bytes", quant_cal, 256) if algo == "gptq" else None
    with torch.no_grad():
        fp = bits_per_byte(model, test)
    sens, secs = {}, {}
    for m in methods:
        t = time.perf_counter()
        sens[m] = mp.sensitivity(model, cal, method=m, config=config, n_probes=n_probes,
                                 progress=progress)
        secs[m] = time.perf_counter() - t
    layers = list(next(iter(sens.values())))
    tested: dict = {}  # test (avg bits, bpb) by allocation: a candidate met again is not rescored
    measured: dict = {}  # calibration loss by allocation (choose_allocation's cache)

    def test_bpb(over):
        k = allocation_key(over)
        if k not in tested:  # one quantization gives both the test and calibration numbers
            q, bpb = _score(model, mp.mixed_config(config, over), test, qcal)
            tested[k] = (measured_bits(q, layers), bpb)
            measured[k] = measure_loss(q, cal)
        return tested[k]

    s0 = sens[methods[0]]
    # uniform averages from the sensitivities' bits (the built layers' storage); a uniform
    # allocation is quantized only where a column needs it (the nearest below / above)
    avg_u = {b: mp.average_bits(s0, mp.uniform(s0, b)) for b in UNIFORM}
    uni: dict = {}

    def uniform_at(b):
        if b not in uni:
            uni[b] = test_bpb(mp.uniform(s0, b))
        return uni[b]

    points = {"uniform": []}

    rows = []
    t_choose = 0.0
    for label in budgets:
        budget = avg_u[int(label[1:])] if label.startswith("u") else float(label)
        fits = [b for b in UNIFORM if avg_u[b] <= budget + 1e-9]
        above = [b for b in UNIFORM if avg_u[b] > budget + 1e-9]
        for b in fits[-1:] + above[:1]:
            uniform_at(b)
        cells = [f"{budget:.3f}"]
        ok = True
        for m in methods:
            t = time.perf_counter()
            for over in candidate_allocations(sens[m], budget, choices, below).values():
                test_bpb(over)  # quantized here once; choose_allocation reads the cache
            pick = choose_allocation(model, config, cal, budget, sens[m], choices, below,
                                     quant_calibration=qcal, cache=measured)
            t_choose += time.perf_counter() - t
            over = pick.overrides
            avg, bpb = test_bpb(over)
            kavg, kbpb = test_bpb(pick.candidates["knapsack"])
            points.setdefault(f"verified ({m})", []).append((avg, bpb))
            points.setdefault(f"knapsack ({m})", []).append((kavg, kbpb))
            counts = {b: sum(1 for v in over.values() if (v or {}).get("bits") == b)
                      for b in UNIFORM}
            counts[None] = sum(1 for v in over.values() if v is None)
            mix = "/".join(str(counts[b]) for b in (*UNIFORM, None))
            cells.append(f"{bpb:.4f} ({avg:.3f} b; {mix}; {pick.label}, of "
                         f"{len(pick.candidates)})")
            cells.append(f"{kbpb:.4f}")
            if fits and bpb > uni[fits[-1]][1]:
                ok = False
        lo = f"w{fits[-1]}: {uni[fits[-1]][1]:.4f} ({uni[fits[-1]][0]:.3f} b)" if fits else "-"
        hi = f"w{above[0]}: {uni[above[0]][1]:.4f} ({uni[above[0]][0]:.3f} b)" if above else "-"
        cells += [lo, hi, "yes" if ok and fits else ("n/a" if not fits else "**no**")]
        rows.append("| " + " | ".join(cells) + " |")
    head = ("| budget (bits/weight) | " + " | ".join(
        f"verified, {m}: bpb (avg bits; 2/3/4/8/float layers; chosen, of candidates) | "
        f"knapsack alone, {m}" for m in methods)
            + " | uniform at or below budget | uniform above budget | verified <= uniform below |")
    qtxt = f"; GPTQ calibrated on {quant_cal} x 256 bytes of valid" if qcal else ""
    lines = [f"wikitext-bytelm, {algo.upper()} g64 asymmetric: bits per byte on WikiText-2 test "
             f"(48 x 256 bytes; fp32 {fp:.4f}); sensitivities on {n_cal} x 256 bytes of "
             f"WikiText-2 valid "
             f"({', '.join(f'{m} {secs[m]:.0f} s' for m in methods)}; Hutchinson "
             f"{n_probes} probes){qtxt}; knapsack over {{{_choices_text(choices)}}}; candidates "
             f"verified by their loss on the same calibration windows ({len(measured)} distinct "
             f"quantizations; {t_choose:.0f} s choosing)", "", head,
             "|" + "---|" * (2 * len(methods) + 4)] + rows
    points["uniform"] = sorted(uni.values())
    lines += ["", "uniform allocations: " + ", ".join(
        f"w{b} {uni[b][1]:.4f} bpb at {uni[b][0]:.3f} bits/weight" for b in sorted(uni))]
    return "\n".join(lines), {"fp32": fp, **points}


def _choices_text(choices) -> str:
    return ", ".join("float16" if c is None else str(c) for c in choices)


def plot(points: dict, path: str | Path, algo: str = "rtn") -> None:
    """Bits per byte vs average bits per weight, one line per curve: all points (left) and
    3.3 to 4.7 bits (right)."""
    plt = pyplot()
    fp = points["fp32"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for ax, zoom in zip(axes, (False, True)):
        for i, (label, ps) in enumerate((k, v) for k, v in points.items() if k != "fp32"):
            ps = sorted(p for p in ps if not zoom or 3.3 <= p[0] <= 4.7)
            ax.plot([p[0] for p in ps], [p[1] for p in ps], marker="o", color=f"C{i}",
                    ls=_STYLE.get(label.split()[0], "-"), label=label, alpha=0.85)
        ax.axhline(fp, color="0.5", lw=1, label=f"fp32 ({fp:.4f})")
        ax.set_xlabel("average bits per weight (scales, zero points included)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits per byte, WikiText-2 test (lower is better)")
    axes[0].legend(fontsize=8)
    axes[1].set_title("3.3 to 4.7 bits", fontsize=9)
    fig.suptitle(f"wikitext-bytelm, {algo.upper()} g64 asymmetric: mixed vs uniform bits",
                 fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qkern.tools.reports.mixed_precision",
                                description="mixed vs uniform bits on wikitext-bytelm")
    p.add_argument("--budgets", default="u2,2.5,3,u3,3.5,4,u4,4.5",
                   help="comma-separated average bits per weight; uN = uniform N bits' average")
    p.add_argument("--methods", default="hutchinson,kl",
                   help=f"sensitivity methods, from {', '.join(mp.METHODS)}")
    p.add_argument("--n-cal", type=int, default=16, help="calibration windows (256 bytes)")
    p.add_argument("--probes", type=int, default=4, help="Hutchinson probes")
    p.add_argument("--algo", default="rtn", choices=sorted(CONFIGS),
                   help="the quantizer (g64 asymmetric; default rtn)")
    p.add_argument("--choices", default="2,3,4,8,float",
                   help="per-layer bits to choose from (float = float16); default 2,3,4,8,float")
    p.add_argument("--below", default="0.025,0.05,0.1",
                   help="the knapsack is also tried this many bits below the budget")
    p.add_argument("--gptq-cal", type=int, default=64,
                   help="GPTQ's calibration windows of 256 bytes (default 64, as the llm report)")
    p.add_argument("--plot", default=None, help="write the PNG plot here")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    a = p.parse_args(argv)
    budgets = [b.strip() for b in a.budgets.split(",")]
    for b in budgets:
        try:
            ok = int(b[1:]) in UNIFORM if b.startswith("u") else float(b) > 0
        except ValueError:
            ok = False
        if not ok:
            p.error(f"bad budget {b!r}: a positive number or u2/u3/u4/u8")
    methods = [m.strip() for m in a.methods.split(",")]
    for m in methods:
        if m not in mp.METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(mp.METHODS)}")
    try:
        choices = tuple(None if c.strip() == "float" else int(c) for c in a.choices.split(","))
        below = tuple(float(d) for d in a.below.split(",")) if a.below.strip() else ()
    except ValueError:
        p.error(f"bad --choices {a.choices!r} / --below {a.below!r}: comma-separated numbers "
                "(choices: bits 2..8 or float)")
    if not choices or any(c is not None and not 2 <= c <= 8 for c in choices):
        p.error(f"bad --choices {a.choices!r}: bits 2..8 or float")
    if any(not d > 0 for d in below):
        p.error(f"bad --below {a.below!r}: positive numbers")
    if a.gptq_cal < 1:
        p.error("--gptq-cal must be at least 1")
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    text, points = pareto_table(budgets, methods, a.n_cal, a.probes, a.algo, choices=choices,
                                below=below, quant_cal=a.gptq_cal)
    print(text)
    if a.plot:
        plot(points, a.plot, a.algo)
        print(f"\nplot: {a.plot}")


if __name__ == "__main__":
    main()
