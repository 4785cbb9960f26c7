"""Shared fixtures: every test leaves qkern's dispatch ISA and thread count as it found them."""

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
    isa, threads = qkern.get_isa(), qkern.get_num_threads()
    yield
    qkern.set_isa(isa)
    qkern.set_num_threads(threads)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
