"""The thread pool under resizing: results never depend on the thread count, and resizing
between parallel calls never hangs (a regression: a worker born during a resize once took
part in a finished job and the next call waited forever). Run in a subprocess with a time
limit so that a hang fails the test instead of stalling the suite."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qkern

SCRIPT = textwrap.dedent("""
    import torch, qkern
    x = torch.randn(3, 1 << 16, generator=torch.Generator().manual_seed(0))
    ref = None
    for i in range(600):
        qkern.set_num_threads(1 + i % 3)
        # few, large groups: the statistics and the codes both run in parallel
        q = qkern.quantize(x, "int4", granularity="channel", symmetric=False)
        q2 = qkern.quantize(x, "int8", rounding="stochastic", seed=7)
        got = (q.codes, q.scale, q.zero_point, q2.codes)
        if ref is None:
            ref = got
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), i
    print("ok")
""")


def test_resize_between_parallel_calls_is_deterministic_and_never_hangs():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=False, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_spin_setting():
    """QKERN_SPIN_US at start-up, set_spin_us at run time (bounds checked); results never
    depend on it."""
    code = "import qkern; print(qkern._C.get_spin_us())"
    env = {**os.environ, "QKERN_SPIN_US": "77"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "77", out.stderr
    before = qkern._C.get_spin_us()
    try:
        x = torch.randn(3, 256)
        ql = qkern.nn.QuantLinear.from_float(torch.nn.Linear(256, 64), fmt="int4", mode="fast")
        qkern._C.set_spin_us(0)
        y0 = ql(x)
        qkern._C.set_spin_us(5000)
        assert qkern._C.get_spin_us() == 5000 and torch.equal(ql(x), y0)
        for bad in (-1, 1000001):
            with pytest.raises(ValueError, match="spin_us must be in 0..1000000"):
                qkern._C.set_spin_us(bad)
    finally:
        qkern._C.set_spin_us(before)


PLACEMENT = textwrap.dedent("""
    import json, os, sys, torch, qkern
    if sys.argv[1] == "one-cpu":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    qkern.set_num_threads(2)
    allowed = os.sched_getaffinity(0)
    qkern.quantize(torch.randn(64, 4096), "int8", granularity="channel")  # a parallel job
    masks = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().strip() == "qkern-worker":
                masks.append(sorted(os.sched_getaffinity(int(tid))))  # a thread's, on Linux
    print(json.dumps([sorted(allowed), masks]))
""")


def _placement(mode: str, env: dict | None = None):
    out = subprocess.run([sys.executable, "-c", PLACEMENT, mode], capture_output=True,
                         text=True, timeout=120, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-2000:]
    allowed, masks = json.loads(out.stdout)
    return set(allowed), [set(m) for m in masks]


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="worker placement is Linux's, and needs two CPUs")
def test_workers_are_kept_off_the_callers_cpu():
    """A sleeping worker woken onto the caller's busy CPU joins a job milliseconds late
    (threadpool.cpp, place_workers): after a parallel job the worker (found by its name in
    /proc) may run anywhere the caller may, except one CPU (the caller's at the time);
    QKERN_PIN_WORKERS=0 leaves it alone, and a caller confined to one CPU leaves the worker's
    inherited mask alone."""
    allowed, masks = _placement("all")
    assert len(masks) == 1, masks
    assert masks[0] < allowed and len(masks[0]) == len(allowed) - 1, (allowed, masks)
    allowed, masks = _placement("all", {"QKERN_PIN_WORKERS": "0"})
    assert masks == [allowed], (allowed, masks)
    allowed, masks = _placement("one-cpu")
    assert len(allowed) == 1 and masks == [allowed], (allowed, masks)
