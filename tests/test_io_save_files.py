"""qkern.save's files: a no-overwrite save is atomic against concurrent savers, a killed save
leaves no temporary file behind once the next save ran, and saved files get the mode a normal
file write would (0o666 less the umask)."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import qkern
from qkern.io import read_safetensors, stale_temp_files, write_safetensors

PYTHON_DIR = Path(qkern.__file__).resolve().parents[1]

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


_KILLED_SAVE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from qkern.io import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * (1 << 20))  # half a file
            f.flush()
        print("writing", flush=True)
        time.sleep(120)

    atomic_write(sys.argv[1], write)
""")


def _temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".qkern-tmp"))


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and pid checks are POSIX")
def test_a_save_killed_mid_write_is_cleaned_up_by_the_next_save(tmp_path):
    path = tmp_path / "m.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path), str(PYTHON_DIR)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        left = _temps(tmp_path)
        assert len(left) == 1 and left[0].startswith(".m.safetensors.")
        assert str(proc.pid) in left[0]  # discoverable: the target and the writer's pid
    finally:
        proc.kill()
        proc.wait()
    assert not path.exists() and _temps(tmp_path) == left  # SIGKILL: nothing ran to clean up
    assert stale_temp_files(path) == [tmp_path / left[0]]
    # temporary files of a live writer and of another target are not touched
    live = tmp_path / f".m.safetensors.{os.getpid()}@{socket.gethostname()}.abc.qkern-tmp"
    other = tmp_path / f".other.safetensors.{proc.pid}@{socket.gethostname()}.abc.qkern-tmp"
    live.write_bytes(b"")
    other.write_bytes(b"")
    keep = sorted([live.name, other.name])
    if not re.fullmatch(r"[A-Za-z0-9-]+", socket.gethostname()):
        keep = []  # host names are sanitized in the temp names: this check needs a plain one
        live.unlink()
        other.unlink()
    qkern.save(_model(0), path)
    assert _temps(tmp_path) == keep
    assert sorted(os.listdir(tmp_path)) == sorted(["m.safetensors", *keep])
    assert read_safetensors(path).keys() == _model(0).state_dict().keys()


_UMASK_SAVES = textwrap.dedent("""
    import os, stat, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    from qkern.io import write_safetensors

    folder = sys.argv[1]
    for umask in (0o022, 0o077, 0o002, 0o027):
        os.umask(umask)
        p = os.path.join(folder, f"u{umask:03o}.safetensors")
        write_safetensors(p, {"x": torch.ones(4)})
        print(f"{umask:o} {stat.S_IMODE(os.stat(p).st_mode):o}")
    os.umask(0o022)
    p = os.path.join(folder, "kept.safetensors")
    write_safetensors(p, {"x": torch.ones(4)})
    os.chmod(p, 0o640)
    write_safetensors(p, {"x": torch.zeros(4)}, overwrite=True)
    print(f"kept {stat.S_IMODE(os.stat(p).st_mode):o}")
""")


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_saved_files_honour_the_umask(tmp_path):
    out = subprocess.run([sys.executable, "-c", _UMASK_SAVES, str(tmp_path), str(PYTHON_DIR)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    modes = dict(line.split() for line in out.splitlines())
    assert modes == {"22": "644", "77": "600", "2": "664", "27": "640", "kept": "640"}, modes
    # qkern.save goes through the same write
    old = os.umask(0o022)
    try:
        qkern.save(_model(0), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert oct((tmp_path / "m.safetensors").stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize("hard_links", [True, False])
def test_the_no_overwrite_step_itself_refuses_existing_files(tmp_path, monkeypatch, hard_links):
    def no_links(*args, **kwargs):  # a file system without hard links (FAT, some FUSE mounts)
        raise OSError(errno.EPERM, "Operation not permitted")

    if not hard_links:
        monkeypatch.setattr(os, "link", no_links)
    p = tmp_path / "a.safetensors"
    write_safetensors(p, {"x": torch.ones(3)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_safetensors(p, {"x": torch.zeros(3)})
    # the atomic step (hard link, or O_EXCL claim without links) refuses it, not the early check
    monkeypatch.setattr(Path, "exists", lambda self: False)
    with pytest.raises(FileExistsError):
        write_safetensors(p, {"x": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(read_safetensors(p)["x"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
