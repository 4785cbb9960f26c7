"""The kernel paths (ISAs) the tests run: every level qkern has, the ones this CPU lacks skipped
with the reason (run pytest with ``-rs`` to see it)."""

from __future__ import annotations

import pytest

import qkern

ALL = ("scalar", "avx2", "avx512")
#: the families with a kernel of their own at the amx level (the int8 W8A8 product; the fast
#: modes of int4, the 4-bit codebooks and int2 / int3; the float-activation W8A16, FP8 and
#: binary / ternary products, where the CPU has AMX-BF16 too); the others run their avx512
#: kernels there, so their tests take ALL
WITH_AMX = ALL + ("amx",)
HAVE = tuple(qkern.available_isas())
WHAT = {"avx2": "AVX2 + FMA + F16C", "avx512": "AVX-512 F/BW/VL/DQ + VNNI",
        "amx": "AMX-TILE + AMX-INT8 (with the OS's permission to use the tile data)"}


def params(isas=ALL):
    """pytest parameters for ``isas``: those this CPU lacks are skipped, naming what is missing."""
    return [pytest.param(i, id=i) if i in HAVE else
            pytest.param(i, id=i, marks=pytest.mark.skip(reason=f"this CPU has no {WHAT[i]}"))
            for i in isas]


def use(isa: str) -> None:
    """Switch qkern to ``isa`` (skipping the test when the CPU lacks it); conftest restores it."""
    if isa not in HAVE:
        pytest.skip(f"this CPU has no {WHAT.get(isa, isa)}")
    qkern.set_isa(isa)
    assert qkern.get_isa() == isa
