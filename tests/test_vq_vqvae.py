"""qkern.vq.vqvae: the VQ-VAE codebook layer and the digits VQ-VAE, against references written
from the definitions (numpy brute-force nearest codes, a numpy EMA of van den Oord et al. 2017
appendix A.1, the identity Jacobian of the straight-through estimator) and against the data's
own variance (the error of predicting the mean)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkern.models import digits as D
from qkern.vq import VQVAE, VQBase, VQCodebook


def _codebook(k, dim, **kw):
    kw.setdefault("init", "random")
    return VQCodebook(k, dim, **kw)


def _set(vq, weight):
    w = torch.as_tensor(weight, dtype=torch.float32)
    with torch.no_grad():
        vq.weight.copy_(w)
        vq.ema_sum.copy_(w)
        vq.ema_count.fill_(1.0)


# ---- the codebook layer -------------------------------------------------------------------
def test_codes_are_the_brute_force_argmin():
    rng = np.random.default_rng(0)
    vq = _codebook(64, 8).eval()
    c = vq.weight.double().numpy()
    z = rng.normal(size=(20, 25, 8))
    z_q, codes, _ = vq(torch.tensor(z))
    assert codes.shape == (20, 25) and codes.dtype == torch.int64
    dist = ((z.reshape(-1, 1, 8) - c[None]) ** 2).sum(-1)
    ref = dist.argmin(axis=1)
    got = codes.reshape(-1).numpy()
    picked = dist[np.arange(len(got)), got]
    # the same code, or one whose distance ties the minimum within float32 rounding
    np.testing.assert_allclose(picked, dist.min(axis=1), rtol=1e-5, atol=1e-6)
    assert (got == ref).mean() > 0.99
    np.testing.assert_allclose(z_q.detach().numpy(), c[got].reshape(z.shape), rtol=1e-6)


def test_straight_through_jacobian_is_the_identity():
    vq = _codebook(8, 3, ema=False).eval()
    z = torch.randn(5, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: vq(t)[0], z)
    np.testing.assert_array_equal(jac.reshape(15, 15).numpy(), np.eye(15))


def test_losses_and_codebook_gradient_follow_the_definition():
    rng = np.random.default_rng(1)
    vq = _codebook(6, 4, ema=False, commitment_weight=0.3)
    z = torch.tensor(rng.normal(size=(40, 4)), dtype=torch.float32, requires_grad=True)
    _, codes, loss = vq(z)
    c, zn, k = vq.weight.detach().numpy().astype(np.float64), z.detach().numpy(), codes.numpy()
    q = c[k]
    mse = ((zn - q) ** 2).mean()
    assert loss.item() == pytest.approx(1.3 * mse, rel=1e-5)
    loss.backward()
    # d/dz: commitment term only, 0.3 * 2 (z - q) / numel; d/de_k: 2 sum_{i: k_i = k} (e_k - z_i)
    np.testing.assert_allclose(z.grad.numpy(), 0.3 * 2 * (zn - q) / zn.size, rtol=1e-4,
                               atol=1e-8)
    ref = np.zeros_like(c)
    np.add.at(ref, k, 2 * (q - zn) / zn.size)
    np.testing.assert_allclose(vq.weight.grad.numpy(), ref, rtol=1e-4, atol=1e-8)
    # EMA codebook: the loss is the commitment term alone
    vq2 = _codebook(6, 4, ema=True, commitment_weight=0.3).eval()
    _set(vq2, c)
    assert vq2(z)[2].item() == pytest.approx(0.3 * mse, rel=1e-5)


def test_ema_update_equals_a_numpy_ema():
    decay, eps = 0.8, 1e-3
    c0 = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, -5.0]])
    vq = _codebook(3, 2, ema=True, decay=decay, eps=eps)
    _set(vq, c0)
    rng = np.random.default_rng(2)
    N, m, e = np.ones(3), c0.copy(), c0.copy()
    for _ in range(3):
        z = rng.normal(size=(7, 2)) * 0.6 + np.array([0.4, 0.4])
        k = ((z[:, None] - e[None]) ** 2).sum(-1).argmin(axis=1)
        n = np.bincount(k, minlength=3)
        s = np.zeros((3, 2))
        np.add.at(s, k, z)
        N = decay * N + (1 - decay) * n
        m = decay * m + (1 - decay) * s
        smoothed = (N + eps) / (N.sum() + 3 * eps) * N.sum()
        _, codes, _ = vq(torch.tensor(z, dtype=torch.float32))
        np.testing.assert_array_equal(codes.numpy(), k)  # quantized with the codebook before
        e = m / smoothed[:, None]
        np.testing.assert_allclose(vq.ema_count.numpy(), N, rtol=1e-6)
        np.testing.assert_allclose(vq.weight.numpy(), e, rtol=1e-5, atol=1e-6)
    assert n[2] == 0 and not np.allclose(e[2], c0[2])  # the unused code moved only by smoothing
    np.testing.assert_allclose(e[2], c0[2], rtol=1e-2)
    # eval mode leaves the codebook alone
    before = vq.weight.clone()
    vq.eval()(torch.randn(9, 2))
    assert torch.equal(vq.weight, before)


def test_dead_codes_are_restarted_on_batch_vectors():
    vq = _codebook(4, 2, ema=False, restart_after=3)
    _set(vq, [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    rng = np.random.default_rng(3)
    for step in range(3):
        z = rng.uniform(-0.2, 1.2, size=(30, 2)).astype(np.float32)
        _, codes, _ = vq(torch.tensor(z))
        assert 3 not in codes.tolist()
        if step < 2:
            assert vq.weight[3].tolist() == [100.0, 100.0] and vq.restarts == 0
    new = vq.weight[3].detach().numpy()
    assert np.abs(z - new).sum(axis=1).min() == 0.0  # one of the last batch's vectors
    np.testing.assert_array_equal(vq.weight[:3].detach().numpy(), [[0, 0], [1, 0], [0, 1]])
    assert vq.restarts == 1 and vq.unused_steps[3] == 0


def test_data_init_and_perplexity():
    z = torch.eye(5) * 3
    vq = VQCodebook(5, 5, init="data")
    _, codes, _ = vq(z)  # first training batch: the codes are (a permutation of) its vectors
    assert sorted(codes.tolist()) == list(range(5))
    assert vq.perplexity == pytest.approx(5.0)
    vq.eval()(z[[0, 0, 0, 1]])
    p = np.array([0.75, 0.25])
    assert vq.perplexity == pytest.approx(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("z, err, msg", [
    (torch.zeros(3, 5), ValueError, "last dimension must be the codebook's dim 4"),
    (torch.tensor([[0.0, 1, float("nan"), 0]]), ValueError, "NaN or Inf \\(1 of 1"),
    (torch.full((2, 2, 4), float("inf")), ValueError, "NaN or Inf \\(4 of 4"),
    (torch.zeros(3, 4, dtype=torch.int64), ValueError, "floating-point"),
    (np.zeros((3, 4)), TypeError, "torch.Tensor"),
])
def test_codebook_rejects(z, err, msg):
    with pytest.raises(err, match=msg):
        VQCodebook(8, 4)(z)


@pytest.mark.parametrize("kw, msg", [({"num_codes": 0}, "num_codes"), ({"decay": 1.0}, "decay"),
                                     ({"restart_after": 0}, "restart_after"),
                                     ({"init": "kmeans++"}, "init"), ({"eps": 0.0}, "eps")])
def test_codebook_rejects_arguments(kw, msg):
    args = {"num_codes": 8, "dim": 4, **kw}
    with pytest.raises(ValueError, match=msg):
        VQCodebook(**args)


# ---- the VQ-VAE ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    data = D.load_data()
    xtr = data.x_train.reshape(len(data.x_train), -1).numpy() * 16
    xte = data.x_test.reshape(len(data.x_test), -1).numpy() * 16
    return xtr, xte


@pytest.fixture(scope="module")
def trained(digits):
    return VQVAE(seed=0).train(digits[0], epochs=30)


def test_vqvae_reconstructs_held_out_digits(digits, trained):
    xtr, xte = digits
    q = trained
    assert q.code_size_bits == 4 * 6
    codes = q.encode(xte)
    assert codes.shape == (len(xte), 4) and codes.min() >= 0 and codes.max() < 64
    mean_mse = ((xte - xtr.mean(axis=0)) ** 2).sum(axis=1).mean()  # predict the train mean
    var = ((xte - xte.mean(axis=0)) ** 2).sum(axis=1).mean()
    mse = ((q.decode(codes) - xte) ** 2).sum(axis=1).mean()
    assert mse == pytest.approx(q.mse(xte), rel=1e-5)
    assert mse < 0.5 * var and mse < 0.5 * mean_mse, (mse, var, mean_mse)
    assert q.history[-1]["perplexity"] > 16  # the codebook is used, not collapsed
    assert q.history[-1]["recon"] < q.history[0]["recon"]


def test_vqvae_save_load_round_trip(tmp_path, digits, trained):
    xte = digits[1]
    path = tmp_path / "vqvae.safetensors"
    trained.save(path)
    q2 = VQBase.load(path)
    assert type(q2) is VQVAE and q2.config() == trained.config()
    codes = trained.encode(xte)
    np.testing.assert_array_equal(q2.encode(xte), codes)
    np.testing.assert_array_equal(q2.decode(codes), trained.decode(codes))
    assert trained.codebook_bits == 32 * sum(p.numel() for p in trained.encoder.parameters()) \
        + 32 * sum(p.numel() for p in trained.decoder.parameters()) + 32 * (64 * 8 + 64 + 1)


def test_vqvae_is_deterministic_given_the_seed(digits):
    x = digits[0][:300]
    kw = {"latent_positions": 2, "code_dim": 4, "num_codes": 16, "hidden": 32}
    a, b = (VQVAE(seed=5, **kw).train(x, epochs=3) for _ in range(2))
    c = VQVAE(seed=6, **kw).train(x, epochs=3)
    sa, sb, sc = a.state(), b.state(), c.state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_vqvae_bad_inputs(trained):
    with pytest.raises(ValueError, match="dimension 63, the quantizer's is 64"):
        trained.encode(np.zeros((2, 63)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        trained.encode(np.full((1, 64), np.nan))
    with pytest.raises(ValueError, match="out of range: column 1 must lie in \\[0, 64\\)"):
        trained.decode(np.array([[0, 64, 0, 0]]))
    with pytest.raises(ValueError, match="shape \\(n, 4\\)"):
        trained.decode(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="latent_positions"):
        VQVAE(latent_positions=0)
    with pytest.raises(TypeError, match="unexpected arguments \\['epoch'\\]"):
        VQVAE(d=4, hidden=8).train(np.ones((8, 4)), epoch=1)
    with pytest.raises(ValueError, match="batch_size"):
        VQVAE(d=4, hidden=8).train(np.ones((8, 4)), batch_size=0)
