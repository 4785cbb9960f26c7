"""qkern against torch's own quantizers (an independent implementation of the same rule:
code = clamp(nearbyint(x * (1/scale)) + zero_point))."""

import pytest
import torch

import qkern

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_:UserWarning")


@pytest.fixture(params=["avx2", "scalar"])
def isa(request):
    qkern.set_isa(request.param)
    yield request.param
    qkern.set_isa("auto")


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 4
    # exact ties: multiples of half a step must round the same way in both
    x[0, :16] = torch.arange(-8, 8) * 0.5 * 0.03125
    return x


def test_per_tensor_int8_matches_torch(isa):
    x = _data((64, 257))
    scale = 0.03125
    ours = qkern.quantize(x, "int8", scale=scale).codes
    ref = torch.quantize_per_tensor(x, scale, 0, torch.qint8).int_repr()
    assert torch.equal(ours, ref)


def test_per_channel_int8_matches_torch(isa):
    x = _data((48, 130), seed=1)
    scale = (x.abs().amax(dim=1) / 127).clamp_min(1e-8)
    ours = qkern.quantize(x, "int8", granularity="channel", scale=scale).codes
    ref = torch.quantize_per_channel(x, scale.double(), torch.zeros(48, dtype=torch.int64), 0,
                                     torch.qint8).int_repr()
    assert torch.equal(ours, ref)


def test_per_channel_axis1_matches_torch(isa):
    x = _data((40, 24), seed=2)
    scale = (x.abs().amax(dim=0) / 127).clamp_min(1e-8)
    ours = qkern.quantize(x, "int8", granularity="channel", axis=1, scale=scale).codes
    ref = torch.quantize_per_channel(x, scale.double(), torch.zeros(24, dtype=torch.int64), 1,
                                     torch.qint8).int_repr()
    assert torch.equal(ours, ref)


def test_dynamic_per_tensor_scale_and_codes_match_torch(isa):
    x = _data((32, 100), seed=3)
    q = qkern.quantize(x, "int8")
    assert float(q.scale) == float(x.abs().max() / 127)
    ref = torch.quantize_per_tensor(x, float(q.scale), 0, torch.qint8).int_repr()
    assert torch.equal(q.codes, ref)


def test_dequantize_matches_torch(isa):
    x = _data((16, 64), seed=4)
    scale = (x.abs().amax(dim=1) / 127).clamp_min(1e-8)
    q = qkern.quantize(x, "int8", granularity="channel", scale=scale)
    tq = torch.quantize_per_channel(x, scale.double(), torch.zeros(16, dtype=torch.int64), 0,
                                    torch.qint8)
    # torch computes (q - zp) * scale in float32 from the double scale it stores
    assert torch.equal(q.dequantize(), tq.dequantize())


def test_asymmetric_uint8_matches_torch_quint8(isa):
    x = _data((24, 96), seed=5) + 0.7
    q = qkern.quantize(x, "uint8", symmetric=False)
    ref = torch.quantize_per_tensor(x, float(q.scale), int(q.zero_point), torch.quint8).int_repr()
    assert torch.equal(q.codes, ref)
