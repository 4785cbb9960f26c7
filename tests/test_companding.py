"""G.711 mu-law / A-law: every int16 input and every code, bit-exact vs Python's audioop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import qkern
import reference as R

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ALL_PCM = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)
ENC = {"mulaw": (qkern.companding.mulaw_encode, audioop.lin2ulaw),
       "alaw": (qkern.companding.alaw_encode, audioop.lin2alaw)}
DEC = {"mulaw": (qkern.companding.mulaw_decode, audioop.ulaw2lin),
       "alaw": (qkern.companding.alaw_decode, audioop.alaw2lin)}


def _ref_encode(law, pcm):
    return np.frombuffer(ENC[law][1](pcm.astype("<i2").tobytes(), 2), np.uint8)


def _ref_decode(law, codes):
    return np.frombuffer(DEC[law][1](codes.astype(np.uint8).tobytes(), 2), "<i2")


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_encode_all_int16_torch(law):
    out = ENC[law][0](torch.from_numpy(ALL_PCM))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), _ref_encode(law, ALL_PCM))


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_encode_all_int16_numpy(law):
    out = ENC[law][0](ALL_PCM)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _ref_encode(law, ALL_PCM))


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_decode_all_codes(law):
    ref = _ref_decode(law, ALL_CODES)
    out_t = DEC[law][0](torch.from_numpy(ALL_CODES))
    assert out_t.dtype == torch.int16
    np.testing.assert_array_equal(out_t.numpy(), ref)
    out_n = DEC[law][0](ALL_CODES)
    assert isinstance(out_n, np.ndarray) and out_n.dtype == np.int16
    np.testing.assert_array_equal(out_n, ref)


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_shapes_and_noncontiguous(law):
    pcm = torch.from_numpy(ALL_PCM[::7].copy()).reshape(-1)[: 64 * 73].reshape(64, 73)
    nc = pcm.t()
    assert not nc.is_contiguous()
    out = ENC[law][0](nc)
    assert out.shape == nc.shape
    np.testing.assert_array_equal(out.numpy(), _ref_encode(law, nc.contiguous().numpy().ravel())
                                  .reshape(nc.shape))
    dec = DEC[law][0](out)
    assert dec.shape == nc.shape


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_empty(law):
    assert ENC[law][0](torch.empty(0, dtype=torch.int16)).numel() == 0
    assert DEC[law][0](torch.empty(0, dtype=torch.uint8)).numel() == 0


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
@pytest.mark.parametrize("rounding", ["nearest_even", "floor", "half_away", "stochastic"])
def test_quantize_through_g711_format(law, rounding, rng):
    """quantize(x, 'mulaw'): t = x/scale rounded to int16 PCM (saturating), then encoded."""
    x = (rng.standard_normal((16, 100)) * rng.uniform(0.01, 100)).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 1e-9, -1e-9]
    qt = qkern.quantize(torch.from_numpy(x), law, rounding=rounding, seed=7)
    codes, scale, deq = R.quantize_codebook(x, law, rounding=rounding, seed=7)
    np.testing.assert_array_equal(qt.codes.numpy().astype(np.int64), codes)
    assert float(qt.scale.reshape(-1)[0]) == float(scale)
    np.testing.assert_array_equal(qt.dequantize().numpy(), deq)


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_quantize_saturates_to_int16(law):
    x = torch.tensor([1e6, -1e6, 40000.0, -40000.0, 32767.0, -32768.0])
    qt = qkern.quantize(x, law, scale=1.0)
    pcm = np.array([32767, -32768, 32767, -32768, 32767, -32768], np.int16)
    np.testing.assert_array_equal(qt.codes.numpy(), _ref_encode(law, pcm))
