"""AWQ checkpoints in the GEMM layout ("version": "gemm"), as AutoAWQ writes them and
transformers, vLLM and GPTQModel read them.

Per quantized linear layer ``<name>`` (weight N out x K in, 4-bit codes, groups of ``G``
inputs):

- ``<name>.qweight`` int32 ``(K, N / 8)``: packed along the **output** dim, eight 4-bit codes
  per word, nibble ``i`` (bits ``4i .. 4i+3``) of word ``c`` holding output column
  ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``;
- ``<name>.qzeros`` int32 ``(K / G, N / 8)``: the zero points, packed the same way and stored
  as they are (no "minus one", unlike GPTQ v1);
- ``<name>.scales`` float16 ``(K / G, N)``; ``<name>.bias`` when the layer has one.

The weight is ``W[n, k] = (u[k, n] - z[k // G, n]) * s[k // G, n]``. ``config.json``'s
``quantization_config``: ``{"quant_method": "awq", "version": "gemm", "bits": 4,
"group_size": G, "zero_point": true}``.

Exactly held: qkern's ``int4`` / ``uint4`` codes and integer zero points (symmetric layers are
written with ``z = 8``), group-wise or one group per row when that is the common group size.
Scales: float16 as for GPTQ (rounded to nearest by default, the weight moving by at most 2^-11
of its magnitude; ``exact=True`` refuses scales float16 does not hold; scales outside
float16's normal range refused). Refused with the layer and the reason: other bit widths, float
zero points (HQQ), non-integer formats, out_features not a multiple of 8, group sizes the one
``group_size`` cannot state. Linear layers of the blocks left in float are listed in
``modules_to_not_convert``.

Import (``qkern.from_pretrained(folder)``): GEMM-layout 4-bit folders onto QuantLinear layers
on the w4 kernel, codes bit-exact, float16 scales exactly float32; "gemv" and other versions
are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.llama import read_weights
from ..nn import QuantLinear
from . import Format, register
from ._common import check_layers, float_tensors, hf_config, write_folder, write_json, write_tensors
from .wna16 import (
    IntWeight,
    build_model,
    check_weight_only,
    common_group_size,
    float_linears_in_blocks,
    half_scales,
    int_weight,
    pack_int32,
    read_config,
    to_qtensor,
    unpack_int32,
)

__all__ = ["AWQFormat", "AWQ_ORDER", "quantization_config"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _order(n: int) -> torch.Tensor:
    """Output columns in packing order: position ``8c + i`` holds column ``8c + AWQ_ORDER[i]``."""
    base = torch.arange(0, n, 8).unsqueeze(1)
    return (base + torch.tensor(AWQ_ORDER)).reshape(-1)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(rows, N) 4-bit values -> (rows, N / 8) int32 words in AWQ's nibble order."""
    return pack_int32(values[:, _order(values.shape[1])], 4, 1)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """(rows, N / 8) int32 words -> (rows, N) 4-bit values, columns in their natural order."""
    vals = unpack_int32(words, 4, 1)
    out = torch.empty_like(vals)
    out[:, _order(vals.shape[1])] = vals
    return out


def quantization_config(group_size: int, not_converted: list[str] | None = None) -> dict:
    """The ``quantization_config`` AutoAWQ writes (``to_transformers_dict``);
    ``not_converted``: linear layers of the blocks left in float (transformers and vLLM skip
    a layer whose name contains one of them)."""
    return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size,
            "zero_point": True, "modules_to_not_convert": not_converted or None}


def _why_not(w: IntWeight | str, n: int, exact: bool) -> str | None:
    if isinstance(w, str):
        return w
    if n % 8:
        return f"out_features {n} is not a multiple of 8 (qweight packs 8 outputs per word)"
    return half_scales(w.scale, exact)[1]


@register
class AWQFormat(Format):
    """``qkern.export(model, out, format="awq", exact=False, dtype=None, overwrite=False)``:
    an AutoAWQ GEMM folder (module docstring); ``dtype`` as for GPTQ."""

    name = "awq"

    def write(self, model: nn.Module, out: Path, exact: bool = False,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        if not isinstance(exact, bool):
            raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        cfg = hf_config(model, "awq")
        check_weight_only(model, "awq")
        weights: dict[str, IntWeight] = {}
        shapes: dict[str, tuple[int, int]] = {}

        def why_not(name, m, q):
            n, k = q.shape
            w = int_weight(q, (4,))
            why = _why_not(w, n, exact)
            if why is None:
                weights[name], shapes[name] = w, (n, k)
            return why

        check_layers(model, "awq", why_not)
        group_size = common_group_size(weights, shapes, "awq", per_row=False)
        tensors = {}
        for key, t in float_tensors(model).items():
            tensors[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        for name, w in weights.items():
            tensors[f"{name}.qweight"] = pack_awq(w.u.T.contiguous())
            tensors[f"{name}.qzeros"] = pack_awq(w.z.T.contiguous())
            tensors[f"{name}.scales"] = half_scales(w.scale.T.contiguous(), exact=False)[0]
        cfg["quantization_config"] = quantization_config(
            group_size, float_linears_in_blocks(model, set(weights)))
        if dtype is not None:
            cfg["dtype"] = str(dtype).removeprefix("torch.")

        def fill(tmp: Path) -> None:
            write_tensors(tmp / "model.safetensors", tensors)
            write_json(tmp / "config.json", cfg)

        return write_folder(out, fill, overwrite)

    def detect(self, path: Path) -> bool:
        p = Path(path)
        try:
            qc = read_config(p).get("quantization_config") if p.is_dir() else None
        except (FileNotFoundError, ValueError):
            return False
        return isinstance(qc, dict) and qc.get("quant_method") == "awq"

    def load(self, path: Path, **options) -> nn.Module:
        if options:
            raise TypeError(f"awq import takes no options, got {sorted(options)}")
        p = Path(path)
        if not self.detect(p):
            raise ValueError(f"{p}: not an AWQ checkpoint (config.json has no "
                             "quantization_config with quant_method 'awq')")
        qc = read_config(p)["quantization_config"]
        version = str(qc.get("version", "gemm")).lower()
        bits = qc.get("bits", qc.get("w_bit"))
        if version != "gemm":
            raise ValueError(f"{p}: AWQ version {version!r}: qkern reads the 'gemm' layout")
        if bits != 4:
            raise ValueError(f"{p}: AWQ bits {bits!r}: the GEMM layout is 4-bit")
        if qc.get("zero_point") is False:
            raise ValueError(f"{p}: AWQ zero_point false: the GEMM layout qkern reads stores "
                             "zero points")
        tensors = read_weights(p)
        names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
        if not names:
            raise ValueError(f"{p}: an AWQ config but no <layer>.qweight tensor")
        layers = {}
        for name in names:
            parts = [tensors.pop(f"{name}.{s}", None) for s in ("qweight", "qzeros", "scales")]
            bias = tensors.pop(f"{name}.bias", None)
            layers[name] = QuantLinear(_read_layer(f"{p}: {name}", *parts), bias)
        return build_model(p, layers, tensors)


def _read_layer(where: str, qw, qz, sc):
    if qw is None or qz is None or sc is None:
        raise ValueError(f"{where}: qweight, qzeros and scales are all needed")
    if qw.dtype != torch.int32 or qz.dtype != torch.int32:
        raise ValueError(f"{where}: qweight/qzeros must be int32, got {qw.dtype}/{qz.dtype}")
    k, n8 = qw.shape
    n = n8 * 8
    if sc.dim() != 2 or sc.shape[1] != n or sc.shape[0] == 0 or k % sc.shape[0]:
        raise ValueError(f"{where}: scales {tuple(sc.shape)} do not fit qweight "
                         f"{tuple(qw.shape)} (expected (in_features / group_size, {n}))")
    if tuple(qz.shape) != (sc.shape[0], n8):
        raise ValueError(f"{where}: qzeros {tuple(qz.shape)}, expected ({sc.shape[0]}, {n8})")
    scale = sc.float().T.contiguous()
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{where}: a scale is NaN or infinite")
    u = unpack_awq(qw).T.contiguous()        # (N, K)
    z = unpack_awq(qz).T.contiguous()        # (N, groups)
    return to_qtensor(where, u, z, scale, 4, k // sc.shape[0])
