"""qkern.io: safetensors files through the safetensors package (lazy reads, every dtype it has,
atomic writes, malformed files rejected with the path named) and qkern.save's output read by
the package itself."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import qkern
from qkern.io import read_safetensors, write_safetensors

PYTHON_DIR = Path(qkern.__file__).resolve().parents[1]


def test_save_output_opens_with_safe_open(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    q = qkern.quantize_model(model, qkern.WeightOnlyConfig(fmt="int4", group_size=32))
    path = tmp_path / "q.safetensors"
    qkern.save(q, path)
    want = {k: v for k, v in q.state_dict().items() if v is not None}
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(want)
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), want[k]), k
        meta = f.metadata()
    assert meta["qkern_format"] == "1" and meta["qkern_version"] == qkern.__version__
    layers = json.loads(meta["qkern_layers"])
    assert set(layers) == {"0", "2"} and layers["0"]["type"] == "QuantLinear"
    assert json.loads(meta["qkern_config"])["fmt"] == "int4"
    back = qkern.load(path, model)
    x = torch.randn(4, 64)
    assert torch.equal(back(x), q(x))


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    out = {"f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(),
           "i8": torch.arange(-12, 12, dtype=torch.int8).view(4, 6),
           "i16": torch.arange(-12, 12, dtype=torch.int16), "i32": torch.arange(24,
                                                                                dtype=torch.int32),
           "i64": torch.tensor([1, -2], dtype=torch.int64),
           "u8": torch.arange(250, 256, dtype=torch.uint8), "bool": x > 0,
           "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    for name in ("float8_e4m3fn", "float8_e5m2"):
        out[name] = x.to(getattr(torch, name))
    for name in ("uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            out[name] = torch.arange(5, dtype=torch.int64).to(getattr(torch, name))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)))


def test_every_dtype_round_trips_and_fp8_reads_back(tmp_path):
    tensors = _every_dtype()
    theirs = tmp_path / "theirs.safetensors"  # written by the package itself
    save_file(tensors, str(theirs), metadata={"format": "pt"})
    got, meta = read_safetensors(theirs, with_metadata=True)
    assert meta == {"format": "pt"} and got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert _same(got[k] if t.numel() else got[k].contiguous(), t), k
    assert got["float8_e4m3fn"].dtype == torch.float8_e4m3fn
    with open(theirs, "rb") as f:  # the header names the fp8 dtype as the package does
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert header["float8_e4m3fn"]["dtype"] == "F8_E4M3"
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, tensors, {"k": "v"})
    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for k, t in tensors.items():
            assert _same(f.get_tensor(k), t), k


def test_write_shared_and_strided_tensors(tmp_path):
    w = torch.randn(8, 4)
    tensors = {"w": w, "tied": w, "row": w[2], "t": w.t(), "view": w.view(4, 8)}
    p = tmp_path / "shared.safetensors"
    write_safetensors(p, tensors)
    got = read_safetensors(p)
    for k, t in tensors.items():
        assert torch.equal(got[k], t), k


def test_writes_are_atomic_and_refuse_existing_files(tmp_path):
    p = tmp_path / "a.safetensors"
    write_safetensors(p, {"x": torch.ones(3)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_safetensors(p, {"x": torch.zeros(3)})
    write_safetensors(p, {"x": torch.zeros(3)}, overwrite=True)
    assert torch.equal(read_safetensors(p)["x"], torch.zeros(3))
    with pytest.raises(ValueError, match="complex128"):  # no safetensors name for it
        write_safetensors(p, {"c": torch.zeros(2, dtype=torch.complex128)}, overwrite=True)
    with pytest.raises(ValueError, match="str to str"):
        write_safetensors(p, {"x": torch.ones(1)}, {"n": 1}, overwrite=True)
    with pytest.raises(TypeError, match="expected a tensor"):
        write_safetensors(p, {"x": [1.0]}, overwrite=True)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        write_safetensors(tmp_path / "nope" / "b.safetensors", {"x": torch.ones(1)})
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temporary file left behind
    assert torch.equal(read_safetensors(p)["x"], torch.zeros(3))  # the failed writes kept it


def _raw(path: Path, header: dict | bytes, data: bytes) -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize("name, header, data", [
    ("overlap", {"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}},
     bytes(12)),
    ("trailing", {"a": {**F32x2, "data_offsets": [0, 8]}}, bytes(12)),
    ("truncated", {"a": {**F32x2, "data_offsets": [0, 8]}}, bytes(4)),
    ("float_offsets", {"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, bytes(8)),
    ("duplicate_keys", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                       b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', bytes(16)),
    ("bad_dtype", {"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    ("bad_shape", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
    ("bad_json", b"{x}", b""),
])
def test_malformed_files_raise_value_error_naming_the_path(tmp_path, name, header, data):
    p = _raw(tmp_path / f"{name}.safetensors", header, data)
    with pytest.raises(ValueError, match=f"{p.name}: not a valid safetensors file"):
        read_safetensors(p)
    with pytest.raises(ValueError, match=p.name):
        qkern.load(p, nn.Linear(2, 2))


def test_too_short_and_missing_files(tmp_path):
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="tiny.safetensors: .*too short"):
        read_safetensors(p)
    with pytest.raises(FileNotFoundError):
        read_safetensors(tmp_path / "absent.safetensors")


_RSS_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[2])
    from qkern.io import read_safetensors

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    tensors = read_safetensors(sys.argv[1])
    after = rss()
    print(after - before, sum(t.numel() * t.element_size() for t in tensors.values()))
""")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_loading_a_large_file_does_not_copy_it(tmp_path):
    p = tmp_path / "big.safetensors"
    write_safetensors(p, {"w": torch.ones(32 << 20), "b": torch.arange(1000.0)})  # 128 MiB
    size = p.stat().st_size
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(p), str(PYTHON_DIR)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    grew, nbytes = (int(v) for v in out.split())
    assert nbytes == (32 << 20) * 4 + 4000
    assert grew < 0.5 * size, f"RSS grew by {grew >> 20} MiB loading a {size >> 20} MiB file"
