"""AWQ data-parallel over torch.distributed: 2 gloo ranks (subprocesses of
tests/dist_worker.py, as tests/test_distributed.py) on the shipped byte-level Llama against the
same worker in one process on all the batches. The scale search's statistics (mean |x|, the
per-alpha output errors) are summed over all batches in the calibration list's order, so every
rank picks the single-process alpha bit for bit; the clip Grams and a linear target's X^T X are
all-reduced sums (another float64 summation order: docs/distributed.md's bound)."""

import pytest
import torch

from test_distributed import assert_identical, assert_within_bound, run

CASES = [("awq", 4), ("awq-gptq", 3)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_awq")
    jobs = [f"{m}:{n}" for m, n in CASES]
    run(jobs, 2, root / "dist")
    run([*jobs, "awq:2"], 0, root / "single")

    def load(kind: str, method: str, n: int, rank: int = 0) -> dict:
        return torch.load(root / kind / f"{method}_{n}_rank{rank}.pt")
    return load


def _same_choices(a: dict, b: dict) -> None:
    assert a["alphas"] == b["alphas"]
    assert a["losses"].keys() == b["losses"].keys()
    for k in ("scales", "clips"):
        assert a[k].keys() == b[k].keys()
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), f"{k} {n}"


@pytest.mark.parametrize("method,batches", CASES)
def test_awq_two_ranks_match_single_process(results, method, batches):
    ranks = [results("dist", method, batches, r) for r in range(2)]
    single = results("single", method, batches)
    assert_identical(ranks[0], ranks[1])
    _same_choices(ranks[0], ranks[1])
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # every rank made the single-process run's choices: the same alpha per pair (the losses
    # bit for bit: summed in the same order), the same scales and clip ratios
    _same_choices(ranks[0], single)
    assert ranks[0]["losses"] == single["losses"]
    assert len(single["alphas"]) == 4 * 4 and any(a > 0 for a in single["alphas"].values())
    if method == "awq":
        assert len(single["clips"]) == 4 * 5  # every linear but q / k
    if method == "awq":  # round to nearest of the same scaled, clamped weights: bit for bit
        assert_identical(ranks[0], single)
    stats = assert_within_bound(ranks[0], single)  # GPTQ's Grams: the bound (observed: 0)
    assert stats["codes"] > 0
    ref = single["logits"]
    rel = float((ranks[0]["logits"] - ref).norm() / ref.norm())
    assert rel <= 1e-2, rel


def test_awq_one_shard_alone_differs(results):
    """The sums over ranks matter: AWQ on 2 of the 4 batches (rank 0's shard) alone makes
    other choices than on all of them (so the test above can fail)."""
    part, full = results("single", "awq", 2), results("single", "awq", 4)
    with pytest.raises(AssertionError):
        _same_choices(part, full)
