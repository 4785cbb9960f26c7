"""Shared fixtures: every test leaves qkern's dispatch ISA, its thread count and torch's as it
found them."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import reference` from any test module

warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*audioop.*")


def _worker_threads() -> int | None:
    """Threads per pytest-xdist worker: the cores shared out among the workers, unless
    OMP_NUM_THREADS is set. Two workers of two threads each on two cores made torch's OpenMP
    regions wait on descheduled threads: docs/serving/awq.md's block took 94 s beside another
    worker instead of 44 s, 284 s in the full suite (2026-12-07, a 2-core EPYC)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // int(workers))


# before torch is imported, so that torch (and qkern, whose default follows torch's) and the
# subprocesses the tests start take it
WORKER_THREADS = _worker_threads()
if WORKER_THREADS is not None:
    os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)


def pytest_configure(config):
    # in case a plugin imported torch before this file was read
    if WORKER_THREADS is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(WORKER_THREADS)
        if "qkern" in sys.modules:
            sys.modules["qkern"].set_num_threads(WORKER_THREADS)


@pytest.fixture(autouse=True)
def _restore_qkern_settings():
    try:
        import qkern
    except ImportError:
        yield
        return
    import torch

    # torch's intra-op thread count too: a test that leaves it changed would change the float
    # sums (and so trained checkpoints) of whatever runs next in the same worker
    isa, threads, torch_threads = qkern.get_isa(), qkern.get_num_threads(), torch.get_num_threads()
    yield
    qkern.set_isa(isa)
    qkern.set_num_threads(threads)
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
