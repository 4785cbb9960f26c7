"""The house rules of docs/architecture.md, read from the source (nothing is imported):

- python/qkern has no import circle;
- no module imports a private (``_name``) definition of another qkern module;
- imports inside functions are only for optional or heavy third-party packages, never qkern's own;
- the layers point one way: tools/ is never imported by the library, models/ imports only io/
  and the decode-step kernels (ops/decode.py), and each layer imports only the layers below it;
- no source file exceeds the size one reads in a sitting.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "qkern"
MAX_LINES = 520


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_package(mod: str) -> bool:
    return MODULES.get(mod, Path()).name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Import:
    def __init__(self, target: str, name: str | None, line: int, in_function: bool):
        self.target, self.name, self.line, self.in_function = target, name, line, in_function


def _imports(mod: str) -> list[_Import]:
    tree = ast.parse(MODULES[mod].read_text())
    found: list[_Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            tc = type_checking or (isinstance(child, ast.If)
                                   and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import) and not tc:
                for a in child.names:
                    found.append(_Import(a.name, None, child.lineno, fn))
            elif isinstance(child, ast.ImportFrom) and not tc:
                target = _resolve(mod, child)
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    if sub in MODULES or a.name in ("_C", "_cuda"):
                        found.append(_Import(sub, None, child.lineno, fn))
                    else:
                        found.append(_Import(target, a.name, child.lineno, fn))
            visit(child, fn, tc)

    visit(tree, False, False)
    return found


IMPORTS = {mod: _imports(mod) for mod in MODULES}


def _internal(target: str) -> str | None:
    """The qkern module a dotted import target lands in (None: outside qkern, or one of the
    compiled extensions, which import nothing of qkern)."""
    if target.endswith(("._C", "._cuda")):
        return None
    while target and target not in MODULES:
        if "." not in target:
            return None
        target = target.rsplit(".", 1)[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    return {mod: {t for i in imps if (t := _internal(i.target)) and t != mod}
            for mod, imps in IMPORTS.items()}


def test_the_reader_sees_the_package():
    assert "qkern.quantization.api" in MODULES and "qkern.nn.linear" in MODULES
    assert "qkern.nn.linear" in _graph()["qkern.nn"]


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_no_private_name_crosses_a_module():
    bad = []
    for mod, imps in IMPORTS.items():
        for i in imps:
            if (i.name and i.name.startswith("_") and not i.name.startswith("__")
                    and _internal(i.target) and _internal(i.target) != mod):
                bad.append(f"{MODULES[mod].relative_to(ROOT)}:{i.line} {i.target}.{i.name}")
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_no_private_attribute_of_another_module():
    """``mod._name`` on a qkern module bound by an import (the other way to reach a private)."""
    bad = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        bound: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node)
                for a in node.names:
                    if f"{target}.{a.name}" in MODULES:
                        bound[a.asname or a.name] = f"{target}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in MODULES:
                        bound[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and node.attr.startswith("_")
                    and not node.attr.startswith("__") and bound[node.value.id] != mod):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} "
                           f"{bound[node.value.id]}.{node.attr}")
    assert not bad, "private attributes of other modules:\n" + "\n".join(bad)


def test_no_qkern_import_inside_functions():
    """Function-level imports are for optional third-party packages; qkern's own modules are
    imported at the top (a function-level one used to hide an import circle)."""
    bad = [f"{MODULES[mod].relative_to(ROOT)}:{i.line} {i.target}"
           for mod, imps in IMPORTS.items() for i in imps
           if i.in_function and _internal(i.target)]
    assert not bad, "qkern imports inside functions:\n" + "\n".join(bad)


# Layers from the bottom up; a module may import its own layer and the layers below it.
LAYERS = [
    ("base", ["qkern.version", "qkern._checks", "qkern.formats", "qkern.layout", "qkern.io",
              "qkern.io.safetensors", "qkern.io.shards"]),
    ("ops", ["qkern.ops"]),
    ("numerics", ["qkern.packing", "qkern.companding", "qkern.tensor", "qkern.quantize",
                  "qkern.hadamard", "qkern.fixed_point", "qkern.logdomain"]),
    ("kernels", ["qkern.kernels"]),
    ("nn", ["qkern.nn", "qkern.observers"]),
    ("models", ["qkern.models"]),
    ("vq", ["qkern.vq"]),
    ("signal", ["qkern.signal"]),
    ("quantization", ["qkern.quantization"]),
    ("files", ["qkern.io.serialization", "qkern.io.skeleton", "qkern.io.hf_config",
               "qkern.io.extras"]),
    ("api", ["qkern"]),
    ("tools", ["qkern.tools", "qkern.__main__", "qkern.bench"]),
]


def _layer(mod: str) -> int:
    best, depth = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    return best


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if _layer(m) < 0]


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_point_down(mod):
    up = sorted(f"{t} ({LAYERS[_layer(t)][0]})" for t in _graph()[mod]
                if _layer(t) > _layer(mod))
    assert not up, f"{mod} ({LAYERS[_layer(mod)][0]}) imports a layer above it: {up}"


def test_models_only_use_io_the_decode_kernels_and_torch():
    allowed = ("qkern.models", "qkern.io", "qkern.ops.decode")
    for mod, deps in _graph().items():
        if mod.startswith("qkern.models"):
            assert all(d.startswith(allowed) for d in deps), (mod, deps)


def _sources():
    for pattern in ("python/qkern/**/*.py", "tests/*.py", "csrc/**/*.h", "csrc/**/*.cpp",
                    "csrc/**/*.cu", "csrc/**/*.cuh"):
        yield from ROOT.glob(pattern)


def test_files_are_small():
    big = [f"{p.relative_to(ROOT)}: {n}" for p in _sources()
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, f"files over {MAX_LINES} lines:\n" + "\n".join(big)


def test_the_add_an_algorithm_recipe_runs():
    """The code block of docs/architecture.md's "Add an algorithm", as written (its relative
    imports made absolute), through quantize_model: every linear becomes int4 in groups of 32
    on the fused kernel."""
    import re
    import sys
    import types

    import torch
    from torch import nn

    import qkern
    from qkern.quantization import registered_configs

    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc.split("### Add an algorithm", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("from ..", "from qkern.quantization.")
    recipe = types.ModuleType("architecture_recipe")  # dataclasses look their module up
    sys.modules[recipe.__name__] = recipe
    exec(compile(code, "docs/architecture.md", "exec"), recipe.__dict__)
    scope = recipe.__dict__
    assert registered_configs()["MyConfig"] is scope["MyConfig"]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [torch.randn(4, 64) for _ in range(3)]
    q = qkern.quantize_model(model, scope["MyConfig"](), calibration=batches)

    def deq(lin):  # int4 in groups of 32 from docs/numerics.md: s = amax / 7 (float32),
        w = lin.weight.detach().float()  # q = clamp(rne(w * (1 / s)), -8, 7), w_hat = q * s
        g = w.reshape(w.shape[0], -1, 32)
        s = g.abs().amax(2, keepdim=True) / 7
        return (torch.clamp(torch.round(g * (1 / s)), -8, 7) * s).reshape(w.shape)

    for i in (0, 2):
        assert q[i].kernel == "w4_exact" and q[i].kernel_reason is None
        assert torch.allclose(q[i].dequantize_weight(), deq(model[i]), rtol=0, atol=1e-6)
    x = torch.cat(batches)
    with torch.no_grad():
        hidden = torch.relu(nn.functional.linear(x, deq(model[0]), model[0].bias))
        want = nn.functional.linear(hidden, deq(model[2]), model[2].bias)
        assert torch.allclose(q(x), want, atol=1e-4)
