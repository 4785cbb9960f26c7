"""``qkern quantize ... --nproc N``: the command re-run on N processes of this machine by
torch.distributed.run (torchrun), data- and layer-parallel (docs/distributed.md); rank 0
writes the output."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

import torch.distributed as dist

from .cmdutil import UsageError

__all__ = ["add_nproc", "in_launch", "init_group", "relaunch", "torchrun_command"]


def add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes on this machine (torchrun, gloo): each calibrates on its "
                        "shard of the data and quantizes its share of the layers; with "
                        "--threads, threads per process (docs/distributed.md)")


def in_launch() -> bool:
    """True inside a torchrun launch (its environment is set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m qkern ARGV``,
    ``--nproc`` taken out of ARGV (the ranks know they are in a launch; torchrun's own
    parser would take ``--nproc`` for an ambiguous abbreviation of its options)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "-m", "qkern", *rest]


def relaunch(args: argparse.Namespace) -> int | None:
    """Runs the command on ``args.nproc`` processes and returns their exit status; None when
    this process is to do the work itself (one process, or a rank of the launch)."""
    n = getattr(args, "nproc", 1)
    if not isinstance(n, int) or n < 1:
        raise UsageError(f"--nproc must be a positive integer, got {n}")
    if n == 1 or in_launch():
        return None
    argv = getattr(args, "argv", None)
    if argv is None:
        raise UsageError("--nproc needs the command line (run it through the qkern command)")
    return subprocess.call(torchrun_command(n, argv))


def init_group() -> int:
    """In a launch, the gloo process group (initialized once); returns this rank (0 outside
    a launch)."""
    if not in_launch():
        return 0
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank()
