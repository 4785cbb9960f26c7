"""qkern.vq's shared interface: input conversion, code checks, save / load (a toy quantizer
that rounds to a grid is the subject; the real quantizers have their own tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkern.vq import NotTrainedError, VQBase, as_codes, as_vectors


class Grid(VQBase):
    kind = "test-grid"

    def __init__(self, d: int, step: float = 1.0):
        super().__init__(d)
        self.step = step
        self.offset = None

    def _train(self, x, **kw):
        self.offset = torch.from_numpy(x.mean(axis=0))

    def _encode(self, x):
        return np.rint((x - self.offset.numpy()) / self.step).astype(np.int64) + 8

    def _decode(self, codes):
        c = as_codes(codes, self.d, 16)
        return ((c - 8) * self.step + self.offset.numpy()).astype(np.float32)

    @property
    def code_size_bits(self):
        return 4 * self.d

    def config(self):
        return {"d": self.d, "step": self.step}

    def state(self):
        return {} if self.offset is None else {"offset": self.offset}

    def _set_state(self, t):
        self.offset = t["offset"]


def test_as_vectors_accepts_numpy_torch_and_lists():
    ref = np.arange(6, dtype=np.float64).reshape(2, 3)
    for x in (ref, torch.tensor(ref), ref.tolist(), ref.astype(np.int32)):
        a = as_vectors(x)
        assert a.dtype == np.float32 and a.flags.c_contiguous and a.shape == (2, 3)
        np.testing.assert_array_equal(a, ref.astype(np.float32))
    assert as_vectors(np.ones(4)).shape == (1, 4)


@pytest.mark.parametrize("x, msg", [
    (np.ones((2, 3, 4)), "must be \\(n, d\\)"),
    (np.ones((0, 3)), "empty"),
    (np.array([[1.0, np.nan], [1, 2]]), "NaN or Inf \\(1 of 2"),
    (np.array([[np.inf, 1.0]]), "NaN or Inf"),
    (np.array([["a", "b"]]), "numeric"),
    (torch.ones(2, 2, dtype=torch.complex64), "real"),
])
def test_as_vectors_rejects(x, msg):
    with pytest.raises(ValueError, match=msg):
        as_vectors(x)


def test_as_vectors_dimension():
    with pytest.raises(ValueError, match="dimension 3, the quantizer's is 4"):
        as_vectors(np.ones((2, 3)), d=4)


def test_as_codes_ranges():
    c = as_codes(np.array([[0, 3], [1, 2]], dtype=np.uint8), 2, [2, 4])
    assert c.dtype == np.int64
    with pytest.raises(ValueError, match="column 0 must lie in \\[0, 2\\)"):
        as_codes(np.array([[2, 0]]), 2, [2, 4])
    with pytest.raises(ValueError, match="column 1"):
        as_codes(np.array([[0, -1]]), 2, 4)
    with pytest.raises(ValueError, match="shape \\(n, 3\\)"):
        as_codes(np.zeros((2, 2), dtype=np.int64), 3, 4)
    with pytest.raises(ValueError, match="integers"):
        as_codes(np.zeros((2, 2)), 2, 4)


def test_untrained_and_bad_d():
    q = Grid(3)
    with pytest.raises(NotTrainedError, match="train"):
        q.encode(np.ones((1, 3)))
    with pytest.raises(NotTrainedError):
        q.decode(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="positive int"):
        Grid(0)
    assert "untrained" in repr(q)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    q = Grid(3, step=0.5).train(x)
    path = tmp_path / "g.safetensors"
    q.save(path)
    q2 = VQBase.load(path)
    assert type(q2) is Grid and q2.step == 0.5 and q2.is_trained
    np.testing.assert_array_equal(q2.decode(q2.encode(x)), q.reconstruct(x))
    assert Grid.load(path).d == 3
    with pytest.raises(FileExistsError):
        q.save(path)
    q.save(path, overwrite=True)
    assert q.codebook_bits == 3 * 32 and q.code_size_bits == 12
    # mse: decoded grid error, summed over coordinates
    err = ((q.reconstruct(x) - x) ** 2).sum(axis=1).mean()
    assert q.mse(x) == pytest.approx(err)


def test_load_rejects_other_files(tmp_path):
    from qkern.io import write_safetensors

    path = tmp_path / "other.safetensors"
    write_safetensors(path, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="not a qkern.vq file"):
        VQBase.load(path)

    class Other(VQBase):
        kind = "test-other"

    q = Grid(2).train(np.ones((3, 2)))
    q.save(tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match="holds a Grid, not a Other"):
        Other.load(tmp_path / "g.safetensors")
