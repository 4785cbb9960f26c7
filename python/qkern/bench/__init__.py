"""``python -m qkern.bench SUITE ...``: the same as ``qkern bench SUITE ...`` (suites in
:mod:`qkern.tools.bench`: core, matmul, decode)."""
