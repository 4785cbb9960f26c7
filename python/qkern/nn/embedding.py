"""QuantEmbedding: an embedding table stored quantized (bit-packed codes + scales), rows
dequantized on lookup by qkern's ops."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .. import formats as QF
from ..layout import Layout
from ..packing import pack_bits, unpack_bits
from ..quantize import quantize
from ..tensor import QTensor, dequantize


class QuantEmbedding(nn.Module):
    """``forward(ids)`` = ``dequantize(W)[ids]``, computed from the gathered rows only.

    Rows are quantized per row (``group_size=None``) or in groups of ``group_size`` along the
    embedding dim; codes are bit-packed row by row (``dim * bits`` must be a multiple of 8)."""

    def __init__(self, qweight: QTensor, padding_idx: int | None = None):
        super().__init__()
        num, dim = qweight.shape
        fmt = qweight.format
        if qweight.granularity not in ("channel", "group") or qweight.axis != (
                0 if qweight.granularity == "channel" else 1):
            raise ValueError("QuantEmbedding needs per-row scales or groups along the row")
        if qweight.double_quant is not None:
            raise ValueError("QuantEmbedding does not support double-quantized scales")
        if dim * fmt.bits % 8:
            raise ValueError(f"embedding dim {dim} x {fmt.bits} bits is not a whole number of "
                             "bytes per row")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num, dim, padding_idx
        codes = qweight.codes.reshape(-1)
        if fmt.kind == "int":  # store code - qmin: unsigned, so bit-packing keeps the value
            codes = (codes.to(torch.int16) - fmt.qmin).to(torch.uint8)
        codes = codes.view(torch.uint8)
        self.register_buffer("codes_packed", pack_bits(codes, fmt.bits).view(num, -1))
        self.register_buffer("scale", qweight.scale.float().reshape(num, -1).contiguous())
        zp = None if qweight.zero_point is None else qweight.zero_point.reshape(num, -1)
        self.register_buffer("zero_point", zp)
        self.weight_q = replace(qweight, codes=None)

    @classmethod
    def from_float(cls, emb: nn.Embedding, fmt: str = "int8", *, group_size: int | None = None,
                   symmetric: bool = True, **quant_kwargs) -> QuantEmbedding:
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"from_float expects an nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("QuantEmbedding does not support max_norm or sparse embeddings")
        f = QF.get(fmt)
        w = emb.weight.detach().float()
        g = group_size if group_size is not None else f.block_size
        if g is None:
            q = quantize(w, f, granularity="channel", axis=0, symmetric=symmetric, **quant_kwargs)
        else:
            if w.shape[1] % g:
                raise ValueError(f"group_size={g} does not divide embedding_dim={w.shape[1]}")
            q = quantize(w, f, granularity="group", axis=1, group_size=g, symmetric=symmetric,
                         **quant_kwargs)
        return cls(q, emb.padding_idx)

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        q, n = self.weight_q, idx.numel()
        codes = unpack_bits(self.codes_packed[idx].reshape(-1), q.format.bits,
                            n * self.embedding_dim)
        if q.format.kind == "int":
            codes = codes.to(torch.int16) + q.format.qmin
            codes = codes.to(torch.int8 if q.format.signed else torch.uint8)
        lay = q.layout
        sub = Layout(lay.granularity, (n, self.embedding_dim), lay.axis, lay.group_size)
        scale = self.scale[idx].reshape(sub.scale_shape)
        zp = None if self.zero_point is None else self.zero_point[idx].reshape(sub.scale_shape)
        part = replace(q, codes=codes.view(n, self.embedding_dim), scale=scale, zero_point=zp,
                       layout=sub)
        return dequantize(part, dtype=torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be int64 or int32, got {ids.dtype}")
        # under torch.compile the data-dependent check would break the graph; the row gather
        # below still refuses an id out of range there (an indexing error)
        if (ids.numel() and not torch.compiler.is_compiling()
                and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings)):
            raise IndexError(f"ids must be in [0, {self.num_embeddings})")
        flat = ids.reshape(-1).long()
        return self._rows(flat).view(*ids.shape, self.embedding_dim)

    def dequantize_weight(self) -> torch.Tensor:
        return self._rows(torch.arange(self.num_embeddings))

    def extra_repr(self) -> str:
        q = self.weight_q
        gran = f"group_size={q.group_size}" if q.granularity == "group" else "per row"
        return (f"{self.num_embeddings}, {self.embedding_dim}, format={q.format.name}, {gran}, "
                f"bits_per_weight={q.bits_per_element:.3f}")
