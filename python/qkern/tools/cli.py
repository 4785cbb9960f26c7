"""The ``qkern`` command line: ``qkern quantize``, ``qkern eval``, ``qkern inspect`` (one module
each: ``quantize_cmd``, ``eval_cmd``, ``inspect_cmd``), ``qkern report``, ``qkern demo``,
``qkern formats``, ``qkern bench``.

Also reachable as ``python -m qkern``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import formats as F
from ..models.assets import ModelNotFoundError
from ..version import __version__
from . import bench, demo, eval_cmd, inspect_cmd, quantize_cmd
from .cmdutil import run_guarded
from .reports import html as report

PROG = "qkern"
#: the practitioner's subcommands: name -> module with add_parser(sub) and run(args)
COMMANDS = {"quantize": quantize_cmd, "eval": eval_cmd, "inspect": inspect_cmd}


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="qkern: quantization for neural networks, built from the numbers up.",
    )
    p.add_argument("--version", action="version", version=f"qkern {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS.values():
        mod.add_parser(sub)

    d = sub.add_parser(
        "demo", help="quantize a real model's weights to every format and print the errors",
        description="Run the demo sections on the models and data shipped in the repository: "
                    "weights (every 2-D weight matrix of a small real model, by default "
                    "models/stories260k, in each format: bits per weight, SQNR, errors), decode "
                    "(wikitext-bytelm bits per byte and tokens/s per scheme), llm (RTN / GPTQ / "
                    "AWQ / HQQ on the wikitext-bytelm), digits (PTQ of an MLP and a CNN), minilm "
                    "(sentence-embedding cosine). Exit status: 0 done; 1 a section was "
                    "skipped (a shipped file or optional package missing: the reason is "
                    "printed); 2 usage error (unknown section or format, no model at --model).",
    )
    d.add_argument("--model", metavar="DIR",
                   help="model directory holding model.safetensors (+ config.json), or a "
                        ".safetensors file (default: $QKERN_DEMO_MODEL, else the repository's "
                        "models/stories260k)")
    d.add_argument("--formats", metavar="LIST",
                   help="comma-separated schemes (e.g. int4-g32-asym) or format names "
                        "(e.g. int4,nf4,log2_8) for the weights section (the other sections "
                        "have fixed schemes); default: all demo schemes")

    d.add_argument("--sections", metavar="LIST", default="all",
                   help="comma-separated demo sections: weights (the weight-format table), "
                        "decode (wikitext-bytelm bits/byte and tokens/s), llm (RTN / GPTQ / "
                        "AWQ / HQQ on the wikitext-bytelm), digits (PTQ of an "
                        "MLP and a CNN), minilm (sentence embeddings); default: all")

    sub.add_parser("formats", help="list every number format qkern knows",
                   description="List every number format: bits, kind, max value, default block "
                               "and description.")

    # `qkern bench ...` is handed to qkern.tools.bench.main untouched (see main); this entry only
    # makes it show up in `qkern --help`.
    sub.add_parser("bench", help="benchmark qkern's kernels (qkern bench --help)", add_help=False)
    sub.add_parser("report", help="HTML report with plots: size vs quality across methods, "
                   "per-layer error, histograms (qkern report --help)", add_help=False)
    return p


def _cmd_demo(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    known = {s.name: s for s in demo.SECTIONS}
    bad = [n for n in names if n != "all" and n not in known]
    if bad or not names:
        print(f"{PROG} demo: error: unknown section(s) {bad or names}; choose from "
              f"{', '.join(known)} or all", file=sys.stderr)
        return 2
    sections = demo.SECTIONS if "all" in names else [known[n] for n in names]
    try:
        ctx = demo.run(model=args.model, formats=args.formats, sections=sections)
    except (ModelNotFoundError, ValueError) as e:
        print(f"{PROG} demo: error: {e}", file=sys.stderr)
        return 2
    if ctx.skipped:  # a shipped file or optional package missing: the demo is incomplete
        print(f"{PROG} demo: {len(ctx.skipped)} section(s) skipped:\n  "
              + "\n  ".join(ctx.skipped), file=sys.stderr)
        return 1
    return 0


def formats_table() -> str:
    lines = ["| format | bits | kind | max value | block | scale | description |",
             "|---|--:|---|--:|--:|---|---|"]
    for name in F.names():
        f = F.get(name)
        block = "" if f.block_size is None else str(f.block_size)
        scale = "E8M0" if f.scale_bits == 8 else f"fp{f.scale_bits}"
        lines.append(f"| {f.name} | {f.bits} | {f.kind} | {f.max_value:g} | {block} | {scale} "
                     f"| {f.description} |")
    return "\n".join(lines)


def _cmd_formats(args: argparse.Namespace) -> int:
    print(formats_table())
    return 0


def _cmd_bench(argv: Sequence[str]) -> int:
    rc = bench.main(list(argv))
    return rc if isinstance(rc, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qkern`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return _cmd_bench(argv[1:])
        if argv and argv[0] == "report":  # parsed by qkern.tools.reports.html.main
            return report.main(argv[1:])
        parser = _build_parser()
        args = parser.parse_args(argv)
        args.argv = argv  # `qkern quantize --nproc N` re-runs itself under torchrun
        if args.command in COMMANDS:
            return run_guarded(args.command, COMMANDS[args.command].run, args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "formats":
            return _cmd_formats(args)
        parser.print_help()
        return 2
    except BrokenPipeError:  # `qkern demo | head`
        sys.stderr.close()
        return 1


if __name__ == "__main__":
    sys.exit(main())
