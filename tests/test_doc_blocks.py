"""Every Python block of README.md and docs/**.md runs on its own, twice in a row when it wrote
files (it must not fail because its file is there), in a fresh folder holding the
checkout's models/ and data/ (links), as a user pasting it would. A block whose imports name a
package that is not installed is skipped with that name."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    out = []
    for f in DOCS:
        text = f.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{f.relative_to(ROOT)}:{line}", m.group(1)))
    return out


BLOCKS = _blocks()


def _missing(code: str) -> list[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 15


@pytest.mark.parametrize("where,code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_runs_twice(where, code, tmp_path):
    if re.search(r"^from \.", code, re.M):
        pytest.skip(f"{where} is a module template for inside the package (relative imports)")
    missing = _missing(code)
    if missing:
        pytest.skip(f"{where} needs {', '.join(missing)} (not installed)")
    for d in ("models", "data"):
        (tmp_path / d).symlink_to(ROOT / d)
    # the qkern this test imports (installed, or a checkout's python/ on PYTHONPATH), absolute
    path = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONWARNINGS": "ignore"}
    before = set(tmp_path.iterdir())
    for run in (1, 2):
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{where} (run {run}) failed:\n{r.stderr[-3000:]}"
        if set(tmp_path.iterdir()) == before:  # wrote nothing here: a second run is the same
            break
