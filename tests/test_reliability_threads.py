"""The thread pool across fork() and its size limit (issue 9, "Hangs").

fork() copies only the calling thread: a child that inherited the parent's pool waited forever
for workers that do not exist. The child must get a working pool, also when another thread of
the parent was inside a parallel op at the fork (its mutexes then are locked in the child).
Every scenario runs in a subprocess with a time limit, so a hang fails the test instead of
stalling the suite."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qkern
from qkern import _C

# Parent: a parallel op (4M elements on 2 threads); then fork; the child runs the same op and
# exits 0 only when its result equals the parent's (no hang, no wrong result).
FORK_SCRIPT = textwrap.dedent("""
    import os, signal, threading, torch, qkern
    qkern.set_num_threads(2)
    x = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))

    def run():
        q = qkern.quantize(x, "int8", granularity="group", group_size=128)
        return q.codes, q.scale

    ref = run() if MODE != "import_only" else None
    stop = threading.Event()
    if MODE == "busy_thread":  # another thread is inside parallel ops during the fork
        def spin():
            while not stop.is_set():
                run()
        t = threading.Thread(target=spin, daemon=True)
        t.start()
    for trial in range(TRIALS):
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a hung child must not outlive the test
            got = run()
            same = ref is None or all(torch.equal(a, b) for a, b in zip(got, ref))
            os._exit(0 if same and qkern.get_num_threads() == 2 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (trial, status)
    stop.set()
    if MODE == "busy_thread":
        t.join()  # not at exit: a daemon thread inside a GIL-released call is killed there
    print("ok")
""")


@pytest.mark.parametrize("mode, trials", [("after_op", 1), ("import_only", 1),
                                          ("busy_thread", 20)])
def test_forked_child_gets_a_working_pool(mode, trials):
    script = f"MODE = {mode!r}\nTRIALS = {trials}\n" + FORK_SCRIPT
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


DATALOADER_SCRIPT = textwrap.dedent("""
    import torch, qkern
    from torch.utils.data import DataLoader, Dataset
    qkern.set_num_threads(2)

    def item(i):
        x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(i))
        return qkern.quantize(x, "int8", granularity="group", group_size=64).codes

    class Quantized(Dataset):
        def __len__(self):
            return 6
        def __getitem__(self, i):
            return item(i)

    item(0)  # the parent's pool is running before the workers fork
    loader = DataLoader(Quantized(), batch_size=None, num_workers=2, timeout=60,
                        multiprocessing_context="fork")
    got = list(loader)
    assert len(got) == 6
    for i, codes in enumerate(got):
        assert torch.equal(codes, item(i)), i
    print("ok")
""")


def test_dataloader_workers_can_call_qkern():
    out = subprocess.run([sys.executable, "-c", DATALOADER_SCRIPT], capture_output=True,
                         text=True, check=False, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_set_num_threads_is_bounded():
    most = _C.max_num_threads()
    assert most == 8 * (os.cpu_count() or 1)
    for n in (4096, most + 1):
        with pytest.raises(ValueError, match=f"at most {most}"):
            qkern.set_num_threads(n)
        with pytest.raises(ValueError, match=f"1..{most}"):  # the binding is public too
            _C.set_num_threads(n)
    with pytest.raises(ValueError, match="1.."):
        _C.set_num_threads(2**40)  # no truncation to int on the way
    before = qkern.get_num_threads()
    qkern.set_num_threads(most)  # the limit itself is accepted and works
    assert qkern.get_num_threads() == most
    x = torch.randn(1 << 16)
    assert torch.equal(qkern.quantize(x, "int8").codes, qkern.quantize(x, "int8").codes)
    qkern.set_num_threads(before)
