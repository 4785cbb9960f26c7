"""The matmul bench's peers (qkern.tools.bench.peers) compute what they are timed as: each
peer's output is x @ W^T (+ bias) of its own dequantized weights, within its precision, and those
weights are a 4-bit / 8-bit approximation of the layer's. The reference product is numpy float64;
a peer whose package is missing (bitsandbytes, gptqmodel) or whose op cannot run here is skipped
with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qkern.tools.bench import matmul, peers

# maker, activations rounded to bfloat16 by the peer, max |y - ref| / max |ref|,
# ||y - ref|| / ||ref||, ||W_deq - W|| / ||W|| (4-bit ~0.07, 8-bit ~0.004 on nn.Linear's init)
PEERS = {
    "aten_int4": (peers.aten_int4, True, 1e-2, 5e-3, 0.12),
    "aten_int8": (peers.aten_int8, True, 1e-2, 5e-3, 0.01),
    "torch_dynamic_int8": (peers.torch_dynamic_int8, False, 6e-2, 5e-2, 0.01),  # int8 x
    "bnb_nf4": (peers.bnb_nf4, False, 1e-5, 1e-5, 0.12),
    "gptqmodel_int4": (peers.gptqmodel_int4, True, 1e-2, 5e-3, 0.12),
}


def _make(name: str, lin: nn.Linear) -> peers.Peer:
    try:
        return PEERS[name][0](lin)
    except ImportError as e:
        pytest.skip(f"{name}: not importable ({e})")
    except RuntimeError as e:  # a CPU without AVX512-BF16, a failed JIT build
        pytest.skip(f"{name}: cannot run here ({str(e).strip().splitlines()[0][:120]})")


def _bf16(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).float().numpy().astype(np.float64)


@pytest.mark.parametrize("name", list(PEERS))
@pytest.mark.parametrize("n,k,bias", [(96, 256, True), (64, 384, False)])
def test_peer_matches_its_dequantized_weights(name, n, k, bias):
    _, bf16_x, tol_max, tol_fro, tol_w = PEERS[name]
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n, bias=bias)
    p = _make(name, lin)
    w = p.weight()
    assert w.shape == (n, k) and w.dtype == torch.float32
    w64, w0 = w.numpy().astype(np.float64), lin.weight.detach().numpy().astype(np.float64)
    assert 1e-4 < np.linalg.norm(w64 - w0) / np.linalg.norm(w0) < tol_w
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for m in (1, 5, 33):
            x = torch.randn(m, k)
            with torch.no_grad():
                y = p.fn(x).float().numpy().astype(np.float64)
            xs = _bf16(x) if bf16_x else x.numpy().astype(np.float64)
            ref = xs @ w64.T
            if p.bias is not None:
                ref = ref + p.bias.numpy().astype(np.float64)
            assert y.shape == (m, n)
            err = np.abs(y - ref)
            assert err.max() <= tol_max * np.abs(ref).max(), (threads, m, err.max())
            assert np.linalg.norm(err) <= tol_fro * np.linalg.norm(ref), (threads, m)
    torch.set_num_threads(1)


def test_bench_skips_a_missing_peer_with_a_line(monkeypatch, capsys):
    def missing(lin):
        raise ImportError("No module named 'gptqmodel'")

    def broken(lin):
        raise RuntimeError("int4_qzero_group_scaled_cpu: failed to compile\nlog ...")

    monkeypatch.setattr(peers, "gptqmodel_int4", missing)
    monkeypatch.setattr(peers, "bnb_nf4", broken)
    monkeypatch.setattr(matmul, "_said", set())  # the lines print once per process
    impls = matmul.implementations(nn.Linear(128, 64))
    out = capsys.readouterr().out
    assert "GPTQModel int4 g128 AVX512-BF16: skipped (not importable: No module named" in out
    assert "bitsandbytes nf4 b64 (matmul_4bit): unavailable (int4_qzero_group_scaled_cpu: " \
           "failed to compile)" in out
    assert not any(k.startswith(("GPTQModel", "bitsandbytes")) for k in impls)
    assert "aten int4 g128 bf16 (_weight_int4pack_mm)" in impls and "qkern int4 g128 fast" in impls
