"""qkern.save's files: a no-overwrite save is atomic against concurrent savers, a killed save
leaves no temporary file behind once the next save ran, and saved files get the mode a normal
file write would (0o666 less the umask)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import qkern
from qkern.io import read_safetensors

N_RACERS = 4


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 16))
    return qkern.quantize_model(model, qkern.WeightOnlyConfig(fmt="int4", group_size=32))


def _racer(path: str, seed: int, barrier, results) -> None:
    q = _model(seed)
    barrier.wait()
    try:
        qkern.save(q, path)
        results.put((seed, "ok"))
    except FileExistsError:
        results.put((seed, "exists"))
    except BaseException as e:  # noqa: BLE001 (reported to the parent)
        results.put((seed, f"{type(e).__name__}: {e}"))


def test_concurrent_no_overwrite_saves_exactly_one_wins(tmp_path):
    ctx = mp.get_context("spawn")
    path = tmp_path / "race.safetensors"
    barrier, results = ctx.Barrier(N_RACERS), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(path), s, barrier, results))
             for s in range(N_RACERS)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    winners = [s for s, r in got.items() if r == "ok"]
    assert len(winners) == 1, got
    assert all(r == "exists" for s, r in got.items() if s != winners[0]), got
    # the file is the winner's complete model, and it loads
    want = {k: v for k, v in _model(winners[0]).state_dict().items() if v is not None}
    tensors = read_safetensors(path)
    assert tensors.keys() == want.keys()
    assert all(torch.equal(tensors[k], want[k]) for k in want)
    back = qkern.load(path, nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 16)))
    x = torch.randn(3, 256)
    assert torch.equal(back(x), _model(winners[0])(x))
    assert sorted(os.listdir(tmp_path)) == ["race.safetensors"]
