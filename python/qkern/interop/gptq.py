"""GPTQ checkpoints, v1 layout ("checkpoint_format": "gptq"), as AutoGPTQ and GPTQModel write
them and transformers (optimum + gptqmodel), vLLM and GPTQModel read them.

Per quantized linear layer ``<name>`` (weight N out x K in, groups of ``G`` inputs):

- ``<name>.qweight`` int32 ``(K * bits / 32, N)``: the unsigned codes ``u`` of column ``n``
  packed along the input dim, LSB first, into a stream of 32-bit words (2/4/8 bits: ``32 /
  bits`` codes per word; 3 bits: 32 codes per 3 words, codes 10 and 21 straddling two);
- ``<name>.qzeros`` int32 ``(K / G, N * bits / 32)``: per group the zero point **minus one**
  (the v1 convention: readers add 1), packed the same way along the output dim;
- ``<name>.scales`` float16 ``(K / G, N)``; ``<name>.g_idx`` int32 ``(K,)``: the group of each
  input (``k // G``: qkern's groups are contiguous); ``<name>.bias`` when the layer has one.

The weight is ``W[n, k] = (u[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``, ``z = stored + 1``;
symmetric layers store ``z = 2^(bits-1)``. ``group_size`` -1 means one group per row.
``config.json`` is the model's transformers config plus ``quantization_config``;
``quantize_config.json`` repeats it for AutoGPTQ-era readers.

What an export holds exactly and what it refuses (each refused layer named with the reason):

- codes and zero points: exactly, for qkern's ``int{2,3,4,8}`` / ``uint{2,3,4,8}`` integer
  grids (``u = c - qmin``, module :mod:`qkern.interop.wna16`); a zero point of 0 is refused:
  v1 stores it as -1, which AutoGPTQ's packer spreads over the neighbouring zero points and
  readers take as 0 (AutoGPTQ's torch path) or 2^bits (vLLM, exllama): no reader agrees;
- scales: GPTQ stores float16, qkern float32. By default each scale is rounded to the nearest
  float16 (the weight moves by at most 2^-11 of its magnitude; scales outside float16's normal
  range are refused); ``exact=True`` refuses any scale float16 does not hold, and
  :func:`qkern.interop.wna16.fp16_scales` gives the qkern model the export holds bit for bit;
- HQQ's float zero points, codebook / float formats, 5..7 bits, double quantization, per-layer
  group sizes the single ``group_size`` cannot state: refused;
- a linear layer left in float inside a block of quantized ones is named in GPTQModel's
  ``dynamic`` override (``{"-:^<name>$": {}}``: not quantized), which GPTQModel and vLLM
  honour; ``lm_head`` says whether the head is quantized.

Import (``qkern.from_pretrained(folder)``) reads v1 and ``gptq_v2`` (zero points stored as
they are) folders onto QuantLinear layers (int4 on the w4 kernel, int2/int3 on w23, int8 on
w8 when symmetric per channel, else the dequant path), codes bit-exact and float16 scales
exactly float32. An act-order (``desc_act``) layer, whose ``g_idx`` is not ``k // G``, becomes
an :class:`ActOrderQuantLinear`: the columns sorted by group (contiguous groups for the
kernels) and the input permuted the same way, exact up to the order of the sums; a ``g_idx``
whose groups are not all of ``G`` inputs is refused. Exporting such a model to GPTQ writes its
``g_idx`` back (``desc_act: true``); other formats refuse it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..models.llama import read_weights
from ..nn import QuantLinear
from ..tensor import QTensor
from ..version import __version__
from . import Format, register
from ._common import (
    float_tensors,
    hf_config,
    quantized_layers,
    write_folder,
    write_json,
    write_tensors,
)
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

__all__ = ["BITS", "ActOrderQuantLinear", "GPTQFormat", "quantization_config"]

BITS = (2, 3, 4, 8)
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _why_not(w: IntWeight | str, k: int, n: int, exact: bool) -> str | None:
    if isinstance(w, str):
        return w
    if k % 32:
        return f"in_features {k} is not a multiple of 32 (qweight packs 32 inputs per word group)"
    if n % 32:
        return (f"out_features {n} is not a multiple of 32 (qzeros packs 32 outputs per word "
                "group; readers allocate out_features // 32 * bits words)")
    if bool((w.z == 0).any()):
        return ("a zero point of 0 (all of a group's weights >= 0): GPTQ v1 stores zero - 1 = "
                "-1, which readers decode differently (0 or 2^bits); not exportable")
    return half_scales(w.scale, exact)[1]


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool = False) -> dict:
    """The ``quantization_config`` of a v1 GPTQ checkpoint (transformers' GPTQConfig fields
    and AutoGPTQ's ``quantize_config.json`` keys)."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size,
            "desc_act": desc_act, "sym": sym, "static_groups": False,
            "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": "gptq",
            "model_file_base_name": "model", "is_marlin_format": False,
            "meta": {"quantizer": [f"qkern:{__version__}"]}}


def _tensors(w: IntWeight, k: int, order: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one layer (its groups are the export's group size); ``order``:
    an act-order layer's input order (its codes are held with column j = input order[j])."""
    u, g_idx = w.u, torch.arange(k, dtype=torch.int64) // w.group
    if order is not None:
        inv = torch.argsort(order)
        u, g_idx = u[:, inv], inv // w.group
    return {"qweight": pack_int32(u.T.contiguous(), w.bits, 0),
            "qzeros": pack_int32((w.z - 1).T.contiguous(), w.bits, 1),
            "scales": half_scales(w.scale.T.contiguous(), exact=False)[0],
            "g_idx": g_idx.to(torch.int32)}


class ActOrderQuantLinear(QuantLinear):
    """A GPTQ act-order (``desc_act``) layer: ``g_idx`` puts input ``k`` in group
    ``g_idx[k]``, the groups are not runs of consecutive inputs. qkern holds the weight with
    its columns sorted by group (``input_order``: column j is input ``input_order[j]``), so
    each group is contiguous for the kernels, and permutes the input to match:
    ``y = x[..., input_order] @ W_sorted^T + b``, the same products summed in another order.
    ``quantized_weight()`` raises (its codes are in sorted order: only the GPTQ export, which
    writes ``g_idx`` back, holds such a layer); ``dequantize_weight()`` is in input order."""

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None, order: torch.Tensor):
        super().__init__(qweight, bias)
        order = torch.as_tensor(order, dtype=torch.long).reshape(-1)
        if not torch.equal(torch.sort(order).values, torch.arange(self.in_features)):
            raise ValueError(f"input_order must be a permutation of range({self.in_features})")
        self.register_buffer("input_order", order.clone(), persistent=True)

    def permuted_weight(self) -> tuple[QTensor, torch.Tensor]:
        """The weight in sorted column order and ``input_order``."""
        return super().quantized_weight(), self.input_order

    def quantized_weight(self) -> QTensor:
        raise NotImplementedError("a GPTQ act-order layer (inputs permuted by g_idx): only "
                                  "format='gptq' holds it")

    def dequantize_weight(self) -> torch.Tensor:
        w = super().dequantize_weight()
        out = torch.empty_like(w)
        out[:, self.input_order] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] == self.in_features:
            x = x.index_select(-1, self.input_order)
        return super().forward(x)


def _collect(model: nn.Module, exact: bool):
    """Each quantized layer as an IntWeight with its shape and act-order input order;
    ValueError naming every layer GPTQ cannot hold (as ``check_layers``, which would refuse
    the act-order layers: their quantized_weight() raises)."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("gptq export: the model has no quantized layers (QuantLinear); "
                         "quantize it first (qkern.quantize_model)")
    found, bad = {}, []
    for name, m in layers.items():
        order = None
        try:
            if isinstance(m, ActOrderQuantLinear):
                q, order = m.permuted_weight()
            else:
                q = m.quantized_weight()
        except NotImplementedError as e:
            bad.append(f"{name}: {e}")
            continue
        n, k = q.shape
        w = int_weight(q, BITS)
        why = _why_not(w, k, n, exact)
        if why is None:
            found[name] = (w, (n, k), order)
        else:
            bad.append(f"{name}: {why}")
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ValueError("gptq export cannot hold these layers exactly:\n  "
                         + "\n  ".join(bad[:8]) + more)
    return found


@register
class GPTQFormat(Format):
    """``qkern.export(model, out, format="gptq", exact=False, dtype=None, overwrite=False)``:
    a v1 GPTQ folder (module docstring). ``dtype``: of the float tensors (embeddings, norms,
    unquantized layers, biases), the model's own by default (torch.float16 halves them as
    AutoGPTQ does, rounding them)."""

    name = "gptq"

    def write(self, model: nn.Module, out: Path, exact: bool = False,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        if not isinstance(exact, bool):
            raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        cfg = hf_config(model, "gptq")
        check_weight_only(model, "gptq")
        found = _collect(model, exact)
        weights = {n: w for n, (w, _, _) in found.items()}
        shapes = {n: shape for n, (_, shape, _) in found.items()}
        bits = {w.bits for w in weights.values()}
        if len(bits) > 1:
            raise ValueError(f"gptq export: GPTQ states one bits value, the layers have "
                             f"{sorted(bits)}")
        group_size = common_group_size(weights, shapes, "gptq", per_row=True)
        sym = all(w.sym for w in weights.values())
        tensors = {}
        for key, t in float_tensors(model).items():
            tensors[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        for name, (w, (_, k), order) in found.items():
            for suffix, t in _tensors(w, k, order).items():
                tensors[f"{name}.{suffix}"] = t
        desc_act = any(order is not None for _, _, order in found.values())
        qc = quantization_config(bits.pop(), group_size, sym, desc_act)
        qc["lm_head"] = "lm_head" in found
        skipped = float_linears_in_blocks(model, set(found))
        if skipped:  # GPTQModel's per-module override ("-:" = not quantized), which vLLM reads
            qc["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in skipped}
        cfg["quantization_config"] = qc
        if dtype is not None:
            cfg["dtype"] = str(dtype).removeprefix("torch.")

        def fill(tmp: Path) -> None:
            write_tensors(tmp / "model.safetensors", tensors)
            write_json(tmp / "config.json", cfg)
            write_json(tmp / "quantize_config.json", qc)

        return write_folder(out, fill, overwrite)

    def detect(self, path: Path) -> bool:
        return _quant_config(path, quiet=True) is not None

    def load(self, path: Path, **options) -> nn.Module:
        if options:
            raise TypeError(f"gptq import takes no options, got {sorted(options)}")
        qc = _quant_config(path, quiet=False)
        fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"{path}: GPTQ checkpoint_format {fmt!r}: qkern reads 'gptq' (v1) "
                             "and 'gptq_v2'")
        bits = qc.get("bits")
        if bits not in BITS:
            raise ValueError(f"{path}: GPTQ bits {bits!r}; GPTQ stores {BITS}")
        tensors = read_weights(path)
        names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
        if not names:
            raise ValueError(f"{path}: a GPTQ config but no <layer>.qweight tensor")
        layers = {}
        for name in names:
            parts = {s: tensors.pop(f"{name}.{s}", None) for s in SUFFIXES}
            bias = tensors.pop(f"{name}.bias", None)
            q, order = _read_layer(path, name, parts, bits, qc.get("group_size"),
                                   fmt == "gptq")
            layers[name] = (QuantLinear(q, bias) if order is None
                            else ActOrderQuantLinear(q, bias, order))
        return build_model(path, layers, tensors)


def _quant_config(path: Path, quiet: bool) -> dict | None:
    """The GPTQ quantization config of folder ``path`` (config.json's quantization_config with
    quant_method "gptq", else quantize_config.json), None (quiet) or ValueError if none."""
    p = Path(path)
    if not p.is_dir():
        if quiet:
            return None
        raise ValueError(f"{p}: a GPTQ checkpoint is a folder")
    try:
        qc = read_config(p).get("quantization_config")
    except (FileNotFoundError, ValueError):
        if quiet:
            return None
        raise
    if isinstance(qc, dict) and qc.get("quant_method") == "gptq":
        return qc
    qfile = p / "quantize_config.json"
    if qc is None and qfile.is_file():
        try:
            q2 = json.loads(qfile.read_text())
        except json.JSONDecodeError as e:
            if quiet:
                return None
            raise ValueError(f"{qfile}: not valid JSON ({e})") from None
        if isinstance(q2, dict) and q2.get("quant_method", "gptq") == "gptq" and "bits" in q2:
            return q2
    if quiet:
        return None
    raise ValueError(f"{p}: not a GPTQ checkpoint (no quantization_config with quant_method "
                     "'gptq' in config.json, no quantize_config.json)")


def _read_layer(path: Path, name: str, parts: dict, bits: int, group_size, v1: bool):
    """The QTensor of one GPTQ layer and, for an act-order layer, the input order that makes
    its groups contiguous (None otherwise); ValueError naming the layer for what qkern cannot
    run exactly."""
    where = f"{path}: {name}"
    missing = [s for s in ("qweight", "qzeros", "scales") if parts[s] is None]
    if missing:
        raise ValueError(f"{where}: no {', '.join(missing)}")
    qw, qz, sc, g_idx = (parts[s] for s in SUFFIXES)
    if qw.dtype != torch.int32 or qz.dtype != torch.int32:
        raise ValueError(f"{where}: qweight/qzeros must be int32, got {qw.dtype}/{qz.dtype}")
    kw, n = qw.shape
    if (kw * 32) % bits or sc.dim() != 2 or sc.shape[1] != n:
        raise ValueError(f"{where}: qweight {tuple(qw.shape)} and scales {tuple(sc.shape)} do "
                         f"not fit {bits}-bit GPTQ")
    k = kw * 32 // bits
    n_groups = sc.shape[0]
    if n_groups == 0 or k % n_groups:
        raise ValueError(f"{where}: {n_groups} scale rows do not divide in_features {k}")
    g = k // n_groups
    if group_size not in (None, -1) and group_size != g and n_groups > 1:
        raise ValueError(f"{where}: scales give groups of {g}, the config says {group_size}")
    if tuple(qz.shape) != (n_groups, n * bits // 32):
        raise ValueError(f"{where}: qzeros {tuple(qz.shape)}, expected "
                         f"({n_groups}, {n * bits // 32})")
    order = None
    if g_idx is not None:
        gi = g_idx.to(torch.int64).reshape(-1)
        if gi.numel() != k or int(gi.min()) < 0 or int(gi.max()) >= n_groups:
            raise ValueError(f"{where}: g_idx must give each of the {k} inputs a group in "
                             f"[0, {n_groups})")
        if not torch.equal(gi, torch.arange(k) // g):  # act order: groups not contiguous
            if not bool((torch.bincount(gi, minlength=n_groups) == g).all()):
                raise ValueError(f"{where}: g_idx groups are not all of {g} inputs: qkern's "
                                 "kernels cannot hold them exactly")
            order = torch.argsort(gi, stable=True)
    u = unpack_int32(qw, bits, 0).T.contiguous()           # (N, K)
    if order is not None:
        u = u[:, order].contiguous()  # columns sorted by group: contiguous groups
    stored = unpack_int32(qz, bits, 1).T.contiguous()      # (N, groups)
    if v1 and bool((stored == 2 ** bits - 1).any()):
        raise ValueError(f"{where}: a stored zero point 2^{bits}-1, i.e. zero {2 ** bits} in "
                         "GPTQ v1, which readers decode differently (0 or 2^bits; usually a "
                         "zero point of 0 mangled by the v1 packer): ambiguous")
    z = stored + 1 if v1 else stored
    scale = sc.float().T.contiguous()
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{where}: a scale is NaN or infinite")
    return to_qtensor(where, u, z, scale, bits, g), order
