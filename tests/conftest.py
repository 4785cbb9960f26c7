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
