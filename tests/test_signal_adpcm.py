"""IMA-ADPCM (qkern.signal) against Python's audioop.lin2adpcm / adpcm2lin, the reference
implementation of the IMA coder, bit for bit: codes, packing, decoded PCM and the state, on
long random int16 streams, sine mixes and the shipped WikiText bytes as a signal, in one call
and split over calls with the state carried (odd lengths included)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import qkern
from qkern.models.assets import shipped_path
from qkern.signal import compress_stream, ima_adpcm_decode, ima_adpcm_encode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def _wikitext_int16() -> np.ndarray:
    raw = shipped_path("data/wikitext-2/wiki.valid.tokens").read_bytes()
    return ((np.frombuffer(raw, np.uint8).astype(np.int16) - 128) * 256).astype(np.int16)


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    t = np.arange(1_200_001)
    sines = (9000 * np.sin(t * 0.01) + 6000 * np.sin(t * 0.137 + 1)
             + 300 * rng.standard_normal(t.size))
    return {"random": rng.integers(-32768, 32768, 1_000_001).astype(np.int16),
            "sines": np.clip(sines, -32768, 32767).astype(np.int16),
            "wikitext": _wikitext_int16()}


SIGNALS = _signals()


def _ref_encode(pcm: np.ndarray, state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return audioop.lin2adpcm(pcm.tobytes(), 2, state)


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_one_call_matches_audioop(name):
    pcm = SIGNALS[name]
    assert pcm.size >= 1_000_000
    ref, ref_state = _ref_encode(pcm, None)
    packed, state = ima_adpcm_encode(pcm, packed=True)
    assert state == ref_state
    # odd length: audioop drops the last code (its output is ours without the last byte)
    assert packed[:pcm.size // 2].tobytes() == ref
    codes, state2 = ima_adpcm_encode(pcm)
    assert state2 == ref_state and codes.max() <= 15
    if pcm.size % 2:  # the last code alone in the high nibble of the last byte
        assert len(packed) == pcm.size // 2 + 1 and packed[-1] == codes[-1] << 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ref_pcm, ref_dstate = audioop.adpcm2lin(ref, 2, None)
    n = 2 * len(ref)
    out, dstate = ima_adpcm_decode(packed[:len(ref)], n)
    assert out.tobytes() == ref_pcm and dstate == ref_dstate
    out2, _ = ima_adpcm_decode(codes[:n], n)
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_split_calls_carry_the_state(name):
    pcm = SIGNALS[name][:300_001]
    cuts = [0, 1, 4, 1001, 77_777, 150_000, 299_999, 300_001]  # odd and even pieces
    whole, whole_state = ima_adpcm_encode(pcm)
    state, ref_state, parts = None, None, []
    dstate, ref_dstate = None, None
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece = pcm[a:b]
        codes, state = ima_adpcm_encode(piece, state)
        ref, ref_state = _ref_encode(piece, ref_state)
        assert state == ref_state, (a, b)
        packed = qkern.pack_bits(codes, 4, order="msb")
        assert packed[:piece.size // 2].tobytes() == ref
        parts.append(codes)
        # the decoder carries its state the same way (audioop decodes whole bytes only)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ref_pcm, ref_dstate = audioop.adpcm2lin(ref, 2, ref_dstate)
        out, dstate = ima_adpcm_decode(codes[:2 * len(ref)], 2 * len(ref), dstate)
        assert out.tobytes() == ref_pcm and dstate == ref_dstate
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert state == whole_state


def test_decode_random_codes_and_states_matches_audioop():
    rng = np.random.default_rng(3)
    for _ in range(20):
        data = rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()
        st = (int(rng.integers(-32768, 32768)), int(rng.integers(0, 89)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ref_pcm, ref_state = audioop.adpcm2lin(data, 2, st)
            ref_codes, ref_estate = audioop.lin2adpcm(ref_pcm, 2, st)
        out, state = ima_adpcm_decode(data, 2 * len(data), st)
        assert out.tobytes() == ref_pcm and state == ref_state
        codes, estate = ima_adpcm_encode(np.frombuffer(ref_pcm, np.int16), st, packed=True)
        assert codes.tobytes() == ref_codes and estate == ref_estate


@pytest.mark.parametrize("threads", [1, 3])
def test_channels_are_independent_streams(threads):
    qkern.set_num_threads(threads)
    rng = np.random.default_rng(5)
    pcm = rng.integers(-20000, 20000, (7, 4001)).astype(np.int16)
    st = np.stack([rng.integers(-30000, 30000, 7), rng.integers(0, 89, 7)], axis=1)
    codes, states = ima_adpcm_encode(pcm, st)
    out, dstates = ima_adpcm_decode(codes, 4001, st)
    for c in range(7):
        ref, ref_state = _ref_encode(pcm[c], tuple(int(v) for v in st[c]))
        assert qkern.pack_bits(codes[c], 4, order="msb")[:2000].tobytes() == ref
        assert tuple(states[c]) == ref_state
        one, _ = ima_adpcm_decode(codes[c], 4001, tuple(int(v) for v in st[c]))
        np.testing.assert_array_equal(out[c], one)
    np.testing.assert_array_equal(dstates, states)  # the decoder tracks the encoder exactly


def test_stream_adpcm_is_scaled_ima_adpcm():
    rng = np.random.default_rng(9)
    x = np.cumsum(rng.standard_normal((500, 6)), axis=0).astype(np.float32)
    c = compress_stream(x, axis=0, method="adpcm", bits=4)
    scale = (np.abs(x).max(axis=0) / 32767).astype(np.float32)
    pcm = np.clip(np.rint(x / scale), -32768, 32767).astype(np.int16)
    ref = np.empty_like(x)
    for ch in range(6):
        data, _ = _ref_encode(pcm[:, ch], None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            dec = np.frombuffer(audioop.adpcm2lin(data, 2, None)[0], np.int16)
        ref[:, ch] = dec.astype(np.float32) * scale[ch]
    np.testing.assert_array_equal(c.decompress(), ref)
    assert c.bits_per_value == pytest.approx(4 + 32 * 6 / x.size)


def test_errors_name_the_problem():
    pcm = np.zeros(10, np.int16)
    with pytest.raises(TypeError, match="int16"):
        ima_adpcm_encode(pcm.astype(np.float32))
    with pytest.raises(ValueError, match="index must lie in 0..88"):
        ima_adpcm_encode(pcm, (0, 89))
    with pytest.raises(ValueError, match="valprev"):
        ima_adpcm_decode(np.zeros(10, np.uint8), 10, (40000, 3))
    with pytest.raises(TypeError, match="pair"):
        ima_adpcm_encode(pcm, (1, 2, 3))
    with pytest.raises(ValueError, match="0..15"):
        ima_adpcm_decode(np.full(10, 16, np.uint8), 10)
    with pytest.raises(ValueError, match="need 5 packed bytes"):
        ima_adpcm_decode(b"\x00" * 4, 10)
    with pytest.raises(ValueError, match="bits=3"):
        compress_stream(np.zeros((4, 2), np.float32), method="adpcm", bits=3)
