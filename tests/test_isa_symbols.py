"""The per-ISA object files must not define a shared (weak, COMDAT) function with their ISA's
instructions that another object file also defines: the linker keeps one copy of such a
function for the whole library (an inline function, a template instance such as
``std::vector<float>::assign``), and if it keeps the AVX2 or AVX-512 one, the scalar path calls
it too and dies of SIGILL on a CPU without that ISA.

Nor may a per-ISA object file initialize anything at load time (a namespace-scope object built by
a function call, e.g. a kernel table filled by a non-constexpr function): the dynamic
initializer runs when the library loads, on every CPU, and the compiler writes it with the
file's ISA (2026-12-06: ``gemm/vq/avx512.cpp`` stored its table with a zmm move and ``import
qkern`` died of SIGILL on an AVX2-only EPYC).

Reads the object files of the C++ build trees under ``build/`` (the wheel build that ``make
test`` installs from, or a development build); skipped, saying so, where none exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: an instruction that needs the ISA: AVX2 (256-bit integer ops, FMA, vpbroadcast, gathers) or
#: AVX-512 (zmm registers, mask registers, the upper 16 vector registers, EVEX masking)
ISA_PATTERNS = {
    "avx2": re.compile(r"ymm|vfn?m(add|sub)|vpbroadcast|vperm|vpgather|vgather|vpdp"),
    "avx512": re.compile(r"zmm|%k[1-7]|[xy]mm(1[6-9]|2\d|3[01])|\{%k"),
}


#: the ISA level of a translation unit (CMakeLists.txt: avx2.cpp / *_avx2.cpp, avx512.cpp /
#: *_avx512.cpp, amx.cpp / *_amx.cpp) -> the instructions to look for in its object file
LEVEL = {"avx2": "avx2", "avx512": "avx512", "amx": "avx512"}


def level_of(obj: Path) -> str | None:
    m = re.fullmatch(r"(?:.*_)?(avx2|avx512|amx)\.cpp\.o", obj.name)
    return m.group(1) if m else None


def build_trees() -> list[Path]:
    trees = []
    for cache in sorted((ROOT / "build").glob("*/CMakeCache.txt")):
        tree = cache.parent
        if "asan" not in tree.name and any(tree.glob("CMakeFiles/qk_cpu.dir/**/*.o")):
            trees.append(tree)
    return trees


NEEDS_BINUTILS = pytest.mark.skipif(shutil.which("nm") is None or shutil.which("objdump") is None,
                                    reason="binutils (nm, objdump) not installed")


def trees_or_skip() -> list[Path]:
    """build_trees(), or the test skipped saying why."""
    trees = build_trees()
    if not trees:
        pytest.skip("no C++ build tree with object files under build/ (run make install)")
    return trees


def weak_definitions(objs: list[Path]) -> dict[str, list[Path]]:
    defs: dict[str, list[Path]] = defaultdict(list)
    for o in objs:
        out = subprocess.run(["nm", "--defined-only", str(o)], capture_output=True, text=True,
                             check=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in ("W", "V", "u"):
                defs[parts[2]].append(o)
    return defs


def function_lines(obj: Path) -> dict[str, list[str]]:
    """``obj``'s functions (mangled names) -> their disassembled instruction lines."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], capture_output=True,
                         text=True, check=True).stdout
    funcs: dict[str, list[str]] = {}
    cur = None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            cur = funcs.setdefault(head.group(1), [])
        elif cur is not None:
            cur.append(line)
    return funcs


def isa_functions(obj: Path | dict[str, list[str]], pattern: re.Pattern) -> set[str]:
    """The functions of ``obj`` (an object file, or its :func:`function_lines`) with at least
    one instruction ``pattern`` matches."""
    funcs = function_lines(obj) if isinstance(obj, Path) else obj
    return {f for f, lines in funcs.items() if any(pattern.search(x) for x in lines)}


@NEEDS_BINUTILS
def test_no_shared_function_carries_isa_instructions():
    trees = trees_or_skip()
    for tree in trees:
        objs = sorted(tree.glob("CMakeFiles/*.dir/**/*.o"))
        defs = weak_definitions(objs)
        bad = []
        for isa, pattern in ISA_PATTERNS.items():
            for obj in [o for o in objs if LEVEL.get(level_of(o)) == isa]:
                # a copy kept from a TU of the same or a higher level only runs where that
                # level's instructions exist (amx TUs are the avx512 set + the tile unit)
                peers = ("avx512", "amx") if isa == "avx512" else ()
                for fn in isa_functions(obj, pattern):
                    others = [o for o in defs.get(fn, []) if o != obj and level_of(o) not in peers]
                    if others:
                        bad.append(f"{fn} ({isa}: {obj.relative_to(tree)}; also in "
                                   f"{', '.join(str(o.relative_to(tree)) for o in others[:3])})")
        assert not bad, f"{tree.name}: shared functions with ISA instructions:\n" + "\n".join(bad)


def dynamic_initializers(obj: Path) -> list[str]:
    """The load-time initializers of ``obj``: its ``.init_array`` section(s), or the
    ``_GLOBAL__sub_I_`` functions GCC and Clang name them with."""
    heads = subprocess.run(["objdump", "-h", str(obj)], capture_output=True, text=True,
                           check=True).stdout
    syms = subprocess.run(["nm", "--defined-only", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    found = [line.split()[1] for line in heads.splitlines() if ".init_array" in line]
    return found + [s.split()[-1] for s in syms.splitlines() if "_GLOBAL__sub_I_" in s]


@NEEDS_BINUTILS
def test_no_per_isa_file_runs_code_at_load_time():
    trees = trees_or_skip()
    bad = []
    for tree in trees:
        for obj in sorted(tree.glob("CMakeFiles/*.dir/**/*.o")):
            found = dynamic_initializers(obj) if level_of(obj) is not None else []
            if found:
                bad.append(f"{tree.name}: {obj.relative_to(tree)}: {found}")
    assert not bad, ("per-ISA files with load-time initializers (make them constexpr or "
                     "build them on first use from the dispatching file):\n" + "\n".join(bad))


@NEEDS_BINUTILS
def test_kernel_table_getters_have_no_isa_instructions():
    """The dispatching files build their ``by_isa`` arrays by calling every level's
    ``avx2_kernels()`` / ``avx512_kernels()`` / ``amx_kernels()`` whatever the CPU has, so
    those getters (compiled with their file's ISA) must be plain code."""
    trees = trees_or_skip()
    bad, seen = [], 0
    for tree in trees:
        for obj in sorted(tree.glob("CMakeFiles/*.dir/**/*.o")):
            level = level_of(obj)
            if level is None:
                continue
            funcs = function_lines(obj)  # one objdump per file
            getters = {m: funcs[m] for m in funcs if re.search(r"(avx2|avx512|amx)_kernels", m)}
            seen += len(getters)
            hits = isa_functions(getters, ISA_PATTERNS[LEVEL[level]])
            bad += [f"{tree.name}: {obj.relative_to(tree)}: {m}" for m in sorted(hits)]
    assert seen > 0, "no kernel-table getter found in the per-ISA object files"
    assert not bad, "kernel-table getters with ISA instructions:\n" + "\n".join(bad)


def test_the_check_finds_an_isa_instance():
    """The pattern sees AVX2 / AVX-512 instructions in objdump's syntax (a check that
    matched nothing would pass vacuously)."""
    assert ISA_PATTERNS["avx2"].search("vbroadcastss %xmm0,%ymm1")
    assert ISA_PATTERNS["avx2"].search("vfmadd231ps %xmm1,%xmm2,%xmm3")
    assert ISA_PATTERNS["avx512"].search("vaddps %zmm1,%zmm2,%zmm3")
    assert [level_of(Path(n)) for n in ("avx2.cpp.o", "f32_avx512.cpp.o", "f32_amx.cpp.o",
                                        "amx.cpp.o", "entry.cpp.o", "scalar.cpp.o")] == [
        "avx2", "avx512", "amx", "amx", None, None]
    assert ISA_PATTERNS["avx512"].search("vmovups %xmm17,(%rax)")
    assert ISA_PATTERNS["avx512"].search("vaddps %ymm1,%ymm2,%ymm3{%k1}")
    assert not ISA_PATTERNS["avx2"].search("addps %xmm1,%xmm2")
    assert not ISA_PATTERNS["avx512"].search("vaddps %ymm1,%ymm2,%ymm3")
