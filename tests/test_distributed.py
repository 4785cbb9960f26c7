"""Data- and layer-parallel quantization over torch.distributed (2 gloo ranks on this
machine, each a subprocess of tests/dist_worker.py) against the single-process run of the same
worker: every rank's quantized layers are identical bit for bit, and equal to the
single-process result within the bound of docs/distributed.md (the Gram sums are added in
another order: the codes may differ only where a value sits on a rounding tie)."""

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import llm_models as LM
import qkern
from qkern.quantization import GPTQConfig, OmniQuantConfig, VQConfig
from qkern.quantization import distributed as D

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
TIMEOUT = 150  # seconds: a hung rank fails the test instead of hanging it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               # the qkern this test imports (installed, or a checkout's python/), and tests/
               PYTHONPATH=os.pathsep.join([str(Path(qkern.__file__).resolve().parents[1]),
                                           str(HERE)]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(jobs: list[str], world: int, out: Path) -> None:
    """Runs the worker on ``jobs`` (``method:batches``) on ``world`` ranks (0: one process
    without a group); its results are in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), str(out), *jobs]
    if world == 0:
        envs = [_env()]
    else:
        port = _free_port()
        envs = [_env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port) for r in range(world)]
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for e in envs]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank hung for more than {TIMEOUT} s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"a rank failed:\n{log[-3000:]}"


CASES = [("gptq", 5), ("gptq-lp", 4), ("rtn", 4), ("smoothquant", 4), ("smoothquant-gptq", 5)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case on 2 ranks and in one process (one launch each: the imports dominate)."""
    root = tmp_path_factory.mktemp("dist")
    jobs = [f"{m}:{n}" for m, n in CASES]
    run([*jobs, "observers:4"], 2, root / "dist")
    run([*jobs, "gptq:3"], 0, root / "single")

    def load(kind: str, method: str, n: int, rank: int = 0) -> dict:
        return torch.load(root / kind / f"{method}_{n}_rank{rank}.pt")
    return load


def assert_identical(a: dict, b: dict) -> None:
    assert a["layers"].keys() == b["layers"].keys()
    for n in a["layers"]:
        for k, x in a["layers"][n].items():
            y = b["layers"][n][k]
            if x is None:
                assert y is None
            else:
                assert torch.equal(x, y), f"{n}.{k} differs between ranks"
    assert torch.equal(a["logits"], b["logits"])


def assert_within_bound(dist_res: dict, single: dict) -> dict:
    """docs/distributed.md's bound: at most 0.1 % of the codes differ, and a differing
    dequantized weight is off by at most two steps of its (possibly re-derived) scale."""
    n_codes = n_diff = 0
    for n, ref in single["layers"].items():
        got = dist_res["layers"][n]
        assert got["codes"].shape == ref["codes"].shape
        diff = got["codes"] != ref["codes"]
        n_codes += diff.numel()
        n_diff += int(diff.sum())
        step = torch.maximum(got["scale"].abs().max(), ref["scale"].abs().max())
        assert float((got["weight"] - ref["weight"]).abs().max()) <= 2 * float(step), n
    assert n_diff <= 1e-3 * n_codes, f"{n_diff} of {n_codes} codes differ"
    return {"codes": n_codes, "differ": n_diff}


@pytest.mark.parametrize("method,batches", CASES)
def test_two_ranks_match_single_process(results, method, batches):
    ranks = [results("dist", method, batches, r) for r in range(2)]
    single = results("single", method, batches)
    assert_identical(ranks[0], ranks[1])
    stats = assert_within_bound(ranks[0], single)
    assert stats["codes"] > 0
    # the logits of the distributed model are those of the single-process one (same codes
    # up to the bound: a relative difference far below the quantization error)
    ref = single["logits"]
    rel = float((ranks[0]["logits"] - ref).norm() / ref.norm())
    assert rel <= 1e-2, rel


def test_shards_are_not_enough_alone(results):
    """The all-reduce matters: GPTQ on one rank's shard alone (3 of 5 batches, what rank 0
    of the 2-rank run sees) gives other codes than on all of them, far beyond the bound (so
    the test above can fail)."""
    with pytest.raises(AssertionError):
        assert_within_bound(results("single", "gptq", 3), results("single", "gptq", 5))


def test_observers_synced(results):
    for r in range(2):
        o = results("dist", "observers", 4, r)
        assert torch.equal(o["min"], o["ref_min"]) and torch.equal(o["max"], o["ref_max"])
        assert torch.equal(o["scale"], o["ref_scale"])


def test_errors_without_group_and_unsupported_method(tmp_path):
    model = LM.build("llama")
    calib = LM.calibration(2, 8)
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        qkern.quantize_model(model, GPTQConfig(bits=4, group_size=32), calib,
                             distributed=True)
    with pytest.raises(TypeError, match="distributed must be"):
        qkern.quantize_model(model, GPTQConfig(bits=4, group_size=32), calib,
                             distributed="yes")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        # what still raises: OmniQuant's training, VQ's codebook fine-tuning
        with pytest.raises(ValueError, match="OmniQuantConfig does not run distributed"):
            qkern.quantize_model(model, OmniQuantConfig(bits=4, group_size=32), calib,
                                 distributed=True)
        with pytest.raises(ValueError, match="VQConfig does not run distributed .finetune"):
            qkern.quantize_model(model, VQConfig(finetune_steps=2), calib, distributed=True)
        dp = D.resolve(True)
        assert (dp.rank, dp.world) == (0, 1)
        assert D.resolve(None) is None  # one rank: automatic mode stays single-process
        assert D.shard([1, 2, 3], dp) == [1, 2, 3]
    finally:
        dist.destroy_process_group()
    fake = D.DataParallel.__new__(D.DataParallel)
    fake.group, fake.rank, fake.world = None, 1, 4
    assert D.shard(list(range(10)), fake) == [1, 5, 9]
    with pytest.raises(ValueError, match="every rank needs at least one batch"):
        D.shard([0, 1, 2], fake)


def test_cli_nproc_2_writes_the_single_process_model(tmp_path):
    """``qkern quantize ... --nproc 2`` (torchrun, 2 gloo ranks; rank 0 writes) against the
    Python API in one process on the same calibration data: within the bound."""
    from cli_util import BYTELM, WIKI_VALID

    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "qkern", "quantize", str(BYTELM), str(out), "--method",
           "gptq", "--bits", "4", "--group-size", "32", "--samples", "2", "--seqlen", "32",
           "--nproc", "2"]
    try:
        p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"qkern quantize --nproc 2 ran for more than {TIMEOUT} s")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("quantized  ") == 1  # rank 0 alone reports and writes
    assert "(28/28)" in p.stderr
    from dist_worker import layers
    from qkern.models import load_llama
    from qkern.quantization import text_calibration

    cal = text_calibration(WIKI_VALID, "bytes", n_samples=2, seqlen=32)
    # on one thread, as each rank (OMP_NUM_THREADS=1, _env): GPTQ's rounding decisions follow
    # the Hessian's last bits, so a reference summed on 2 threads differs by more than the
    # all-reduce does (alone on this 2-core machine: 2.4 steps)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    qkern.set_num_threads(1)  # restored by conftest
    try:
        single = qkern.quantize_model(load_llama(BYTELM), GPTQConfig(bits=4, group_size=32),
                                      cal, progress=False)
    finally:
        torch.set_num_threads(torch_threads)
    got = layers(qkern.from_pretrained(out))
    want = layers(single)
    assert got.keys() == want.keys() and len(got) == 28
    assert_within_bound({"layers": got}, {"layers": want})
