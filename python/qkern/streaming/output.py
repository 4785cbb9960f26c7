"""The folder ``quantize_pretrained`` writes, and its progress manifest.

The result is a transformers checkpoint folder of qkern's format (what
``qkern.export(model, out, format="qkern")`` writes with shards): ``config.json`` with a
qkern ``quantization_config``, ``model-XXXXX-of-YYYYY.safetensors`` shards (the first one
holds the tensors outside the blocks, shard ``i + 2`` block ``i``'s) and
``model.safetensors.index.json``. Each shard is written atomically (temp + rename) when its
part is done; ``config.json`` and the index come last, so a folder with a ``config.json``
is a finished one. ``qkern-progress.json`` (also written atomically) records the run (its
config, calibration digest, the checkpoint's files) and the blocks finished;
``.qkern-stream/`` holds the checkpointed block inputs while the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from ..io.safetensors import atomic_write
from .activations import iter_tensors

__all__ = ["MANIFEST", "WORK", "OutFolder", "calibration_digest", "run_state"]

MANIFEST = "qkern-progress.json"
WORK = ".qkern-stream"
_FINAL = ("config.json", "model.safetensors.index.json", "generation_config.json")


def calibration_digest(batches: list) -> str:
    """A SHA-256 of the calibration batches (their tensors' dtypes, shapes and bytes, and the
    structure around them): a resumed run must see the same data."""
    h = hashlib.sha256()
    for b in batches:
        h.update(repr(type(b).__name__).encode())
        for t in iter_tensors(b if not hasattr(b, "args") else (b.args, b.kwargs)):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_state(out_dir: str | Path) -> str | None:
    """What ``out_dir`` holds: "finished" or "unfinished" (a quantize_pretrained run, by its
    manifest), None for anything else (no folder, or not one of ours)."""
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except ValueError:
        return None
    if not isinstance(m, dict) or m.get("format") != 1:
        return None
    return "finished" if m.get("finished") else "unfinished"


class OutFolder:
    """``out_dir`` of one run of ``n_blocks`` blocks."""

    def __init__(self, path: Path, n_blocks: int):
        self.path, self.n_blocks = Path(path), n_blocks
        self.work = self.path / WORK

    def shard(self, k: int) -> str:
        """The file name of shard ``k`` (0: the tensors outside the blocks, 1 + i: block i)."""
        return f"model-{k + 1:05d}-of-{self.n_blocks + 1:05d}.safetensors"

    def inputs_dir(self, i: int) -> Path:
        return self.work / f"inputs-{i:05d}"

    def read_manifest(self) -> dict | None:
        p = self.path / MANIFEST
        if not p.is_file():
            return None
        try:
            m = json.loads(p.read_text())
        except ValueError as e:
            raise ValueError(f"{p}: not valid JSON ({e}); remove the folder or pass "
                             "resume=False") from None
        if not isinstance(m, dict) or m.get("format") != 1:
            raise ValueError(f"{p}: not a quantize_pretrained manifest")
        return m

    def write_manifest(self, m: dict) -> None:
        data = json.dumps(m, indent=1, sort_keys=True) + "\n"
        atomic_write(self.path / MANIFEST, lambda tmp: Path(tmp).write_text(data),
                     overwrite=True)

    def prepare(self, resume: bool, expect: dict) -> dict:
        """The manifest to go on from: the folder's own when ``resume`` and it belongs to the
        same run (``expect``: its identifying fields), else a fresh one (the files of an
        earlier run removed). FileExistsError for a non-empty folder that is not one of
        ours; ValueError when ``resume`` finds a different run."""
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.read_manifest()
        if old is None:
            if any(self.path.iterdir()):
                raise FileExistsError(f"{self.path} is not empty and holds no {MANIFEST}: not "
                                      "a quantize_pretrained output; choose another out_dir")
        elif resume:
            diff = [k for k in expect if old.get(k) != expect[k]]
            if diff:
                raise ValueError(f"{self.path} holds a run with other {', '.join(diff)}; pass "
                                 "resume=False to start it over, or choose another out_dir")
            return old
        else:
            self.clear(old)
        return {"format": 1, **expect, "done": [], "report": [], "skipped": {}, "notes": {},
                "layers": {}, "weight_map": {}, "total_size": 0, "finished": False}

    def clear(self, old: dict) -> None:
        """Removes the files an earlier run wrote (the manifest last)."""
        for name in [*set(old.get("weight_map", {}).values()), *_FINAL]:
            (self.path / name).unlink(missing_ok=True)
        for k in range(self.n_blocks + 1):
            (self.path / self.shard(k)).unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        (self.path / MANIFEST).unlink(missing_ok=True)

    def write_index(self, m: dict) -> None:
        index = {"metadata": {"total_size": m["total_size"]},
                 "weight_map": dict(sorted(m["weight_map"].items()))}
        data = json.dumps(index, indent=2, sort_keys=True) + "\n"
        atomic_write(self.path / "model.safetensors.index.json",
                     lambda tmp: Path(tmp).write_text(data), overwrite=True)
