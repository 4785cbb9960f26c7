"""GGUF -> qkern: a llama-architecture GGUF file on qkern's kernels (``qkern.from_pretrained``).

Linear weights of the types qkern holds exactly become QuantLinear layers: Q4_0 -> int4 groups
of 32 (the w4 kernel), Q5_0 -> int5 g32, Q8_0 -> int8 g32, Q6_K -> int6 g16, scale = the
block's fp16 ``d`` as float32 (Q6_K: ``d * sc``, exact in float32), each checked to give
``gguf.quants.dequantize``'s values bit for bit. Float tensors (F32/F16/BF16) and quantized
embeddings / norms load as float. Other types are refused, or loaded as float weights with
``unsupported="float"``. The q/k rows are put back in transformers' order.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import formats as QF
from ..layout import Layout
from ..models.llama import Llama as QLlama
from ..models.llama import LlamaConfig as QLlamaConfig
from ..nn import QuantLinear
from ..tensor import QTensor
from .gguf_arch import LINEARS, NORMS, Hparams, gguf_unpermute, read_hparams

try:
    import gguf as G
    import gguf.quants as QK
    from gguf.quants import dequantize as gguf_dequantize
except ImportError as e:  # pragma: no cover - gguf is a dependency of the interop extra
    raise ImportError("GGUF export/import needs the gguf package: pip install gguf") from e

__all__ = ["EXACT_TYPES", "exact_qtensor", "load_gguf"]

T = G.GGMLQuantizationType
#: GGUF type -> (qkern format, group size) of the types qkern can hold exactly (Q4_1, Q5_1, Q4_K,
#: Q5_K only when their mins are integer multiples of their scales: checked per tensor)
EXACT_TYPES = {T.Q4_0: ("int4", 32), T.Q5_0: ("int5", 32), T.Q8_0: ("int8", 32),
               T.Q6_K: ("int6", 16), T.Q4_1: ("uint4", 32), T.Q5_1: ("uint5", 32),
               T.Q4_K: ("uint4", 32), T.Q5_K: ("uint5", 32)}  # int: uint with zero points
_FLOAT = (T.F32, T.F16, T.BF16)


def _rows(t) -> tuple[int, int]:
    shape = [int(s) for s in t.shape]  # ggml order: shape[0] is the row length
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1, shape[0]


def _values(t) -> np.ndarray:
    """The tensor's values as the gguf package decodes them, (rows, row length) float32."""
    n, k = _rows(t)
    try:
        v = gguf_dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"{t.name}: the gguf package cannot decode {t.tensor_type.name}") from e
    return np.asarray(v, np.float32).reshape(n, k)


def _scales(t, n: int, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-group scale and min M (value = scale * u - M) from the raw blocks, (n, k // g)."""
    tt = t.tensor_type
    size = G.GGML_QUANT_SIZES[tt][1]
    b = np.array(t.data, copy=True).reshape(n, -1, size)

    def f16(lo: int) -> np.ndarray:
        return b[:, :, lo:lo + 2].copy().view(np.float16).astype(np.float32)[..., 0]

    if tt == T.Q6_K:  # ql, qh, 16 int8 sc, d
        sc = b[:, :, 192:208].copy().view(np.int8).astype(np.float32)
        return (f16(208)[..., None] * sc).reshape(n, -1), None
    if tt in (T.Q4_K, T.Q5_K):  # d, dmin, 12 bytes of 6-bit sc and m
        sc, m = QK.Q4_K.get_scale_min(b[:, :, 4:16].reshape(-1, 12))
        sc, m = sc.reshape(n, -1, 8).astype(np.float32), m.reshape(n, -1, 8).astype(np.float32)
        return ((f16(0)[..., None] * sc).reshape(n, -1),
                (f16(2)[..., None] * m).reshape(n, -1))
    if tt in (T.Q4_1, T.Q5_1):  # d, m: value = d * u + m
        return f16(0), -f16(2)
    return f16(0), None  # Q4_0, Q5_0, Q8_0: d


def exact_qtensor(t, values: np.ndarray) -> QTensor | str:
    """A QTensor whose values are the GGUF tensor's (``values``, as ``gguf.quants`` decodes
    them) bit for bit, or the reason there is none.

    Every type is read as unsigned codes u with an integer zero point z per group: value =
    (u - z) * scale. Q4_0/Q5_0/Q8_0/Q6_K: scale d (Q6_K: d * sc), z = 2^(bits-1); Q4_1/Q5_1:
    scale d, z = -m / d; Q4_K/Q5_K: scale d*sc, z = dmin*m / (d*sc), which must be an integer
    in the code range (rare for files llama.cpp quantized). Both sides round the same real
    number once, so they agree exactly. A negative scale (ggml's Q4_0 takes d = max / -8) is
    made positive by flipping the codes (u -> 2^bits - 1 - u, z likewise); a zero scale holds
    zeros (scale 1, u = z). When every z is 2^(bits-1) the result is the signed format
    (int4 ...) without zero points; Q8_0 with one d per row becomes int8 per output channel
    (the w8 kernel). The result is checked against ``values``."""
    fmt, g = EXACT_TYPES[t.tensor_type]
    bits = QF.get(fmt).bits
    off, umax = 2 ** (bits - 1), 2 ** bits - 1
    n, k = _rows(t)
    scale, M = _scales(t, n, k)
    zero = scale == 0
    safe = np.where(zero, np.float32(1), scale)
    if M is None:
        z = np.full(scale.shape, off, np.float32)
    else:
        if not np.all(M[zero] == 0):
            return "a group with scale 0 has a nonzero min"
        z = np.where(zero, np.float32(off), M / safe)
        if not (np.all(z == np.rint(z)) and z.min() >= 0 and z.max() <= umax):
            return (f"its mins ({'dmin*m' if t.tensor_type in (T.Q4_K, T.Q5_K) else '-m'}) "
                    "are not integer multiples of its scales in the code range, so qkern's "
                    "(q - z) * s cannot reproduce its values exactly")
    zr = np.repeat(z, g, axis=1)
    u = np.rint(values / np.repeat(safe, g, axis=1) + zr)
    if u.min() < 0 or u.max() > umax:
        return "its codes fall outside the code range"
    neg = np.repeat(safe < 0, g, axis=1)
    u, zr = np.where(neg, umax - u, u), np.where(neg, umax - zr, zr)
    z, safe = np.where(safe < 0, umax - z, z), np.abs(safe)
    if not np.array_equal(((u - zr) * np.repeat(safe, g, axis=1)).astype(np.float32), values):
        return "scale * code does not reproduce its values"
    lay = Layout("group", (n, k), 1, g)
    s_t = torch.from_numpy(np.ascontiguousarray(safe, np.float32))
    if bits == 8 and np.all(z == off) and np.all(safe == safe[:, :1]):
        # one d per row (qkern's int8 per channel, exported): per channel, on the w8 kernel
        return QTensor(torch.from_numpy((u - off).astype(np.int8)),
                       torch.from_numpy(np.ascontiguousarray(safe[:, 0], np.float32)), None,
                       QF.get("int8"), Layout("channel", (n, k), 0, k))
    if np.all(z == off):
        return QTensor(torch.from_numpy((u - off).astype(np.int8)), s_t, None,
                       QF.get(f"int{bits}"), lay)
    return QTensor(torch.from_numpy(u.astype(np.uint8)), s_t,
                   torch.from_numpy(z.astype(np.int32)), QF.get(f"uint{bits}"), lay)


def _unpermute_q(q: QTensor, heads: int) -> QTensor:
    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.from_numpy(
            np.ascontiguousarray(gguf_unpermute(x.numpy(), heads)))
    return replace(q, codes=rows(q.codes), scale=rows(q.scale), zero_point=rows(q.zero_point))


def _build(hp: Hparams, backend: str, biases: set[str]) -> nn.Module:
    if backend == "qkern":
        if hp.head_dim * hp.num_attention_heads != hp.hidden_size:
            raise ValueError("backend='qkern' needs head_dim * heads == hidden size; use "
                             "backend='transformers'")
        return QLlama(QLlamaConfig(hp.vocab_size, hp.hidden_size, hp.intermediate_size,
                                   hp.num_hidden_layers, hp.num_attention_heads,
                                   hp.num_key_value_heads, hp.max_position_embeddings,
                                   hp.rms_norm_eps, hp.rope_theta, hp.tie_word_embeddings))
    if backend != "transformers":
        raise ValueError(f"backend must be 'transformers' or 'qkern', got {backend!r}")
    try:
        import transformers  # optional dependency
    except ImportError as e:
        raise ImportError("backend='transformers' needs transformers: pip install "
                          "'qkern[hf]' (or pass backend='qkern')") from e
    cfg = transformers.LlamaConfig(
        vocab_size=hp.vocab_size, hidden_size=hp.hidden_size,
        intermediate_size=hp.intermediate_size, num_hidden_layers=hp.num_hidden_layers,
        num_attention_heads=hp.num_attention_heads, num_key_value_heads=hp.num_key_value_heads,
        head_dim=hp.head_dim, max_position_embeddings=hp.max_position_embeddings,
        rms_norm_eps=hp.rms_norm_eps, tie_word_embeddings=hp.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": hp.rope_theta},
        attention_bias="attn_q" in biases, mlp_bias="ffn_up" in biases)
    return transformers.LlamaForCausalLM(cfg)


def _hf_names(hp: Hparams) -> dict[str, tuple[str, bool]]:
    """gguf tensor name -> (HF parameter name, is a linear weight)."""
    out = {"token_embd.weight": ("model.embed_tokens.weight", False),
           "output_norm.weight": ("model.norm.weight", False),
           "output.weight": ("lm_head.weight", True)}
    for i in range(hp.num_hidden_layers):
        for hf, gg in NORMS.items():
            out[f"blk.{i}.{gg}.weight"] = (f"model.layers.{i}.{hf}.weight", False)
        for hf, gg in LINEARS.items():
            out[f"blk.{i}.{gg}.weight"] = (f"model.layers.{i}.{hf}.weight", True)
            out[f"blk.{i}.{gg}.bias"] = (f"model.layers.{i}.{hf}.bias", False)
    return out


def load_gguf(path: Path, backend: str = "transformers", unsupported: str = "error"
              ) -> nn.Module:
    """The llama model of a GGUF file on qkern's kernels (see the module docstring)."""
    if unsupported not in ("error", "float"):
        raise ValueError(f"unsupported must be 'error' or 'float', got {unsupported!r}")
    r = G.GGUFReader(path)
    hp = read_hparams(r, path)
    names = _hf_names(hp)
    heads = {"attn_q": hp.num_attention_heads, "attn_k": hp.num_key_value_heads}
    unknown = [t.name for t in r.tensors if t.name not in names and t.name != "rope_freqs.weight"]
    if unknown:
        raise ValueError(f"{path}: tensors qkern's llama does not know: {', '.join(unknown[:6])}")
    state, quant, refused = {}, {}, []
    for t in r.tensors:
        if t.name == "rope_freqs.weight":  # llama3 rope scaling factors
            raise ValueError(f"{path}: rope_freqs (llama3 rope scaling) is not supported")
        hf, linear = names[t.name]
        gg = t.name.split(".")[-2]
        ph = heads.get(gg) if t.name.startswith("blk.") else None
        v = _values(t)
        if linear and t.tensor_type not in _FLOAT:
            q = (exact_qtensor(t, v) if t.tensor_type in EXACT_TYPES
                 else "qkern has no format for it")
            if isinstance(q, QTensor):
                quant[hf.rpartition(".")[0]] = q if ph is None else _unpermute_q(q, ph)
                continue
            refused.append(f"{t.name} ({t.tensor_type.name}): {q}")
        if len(t.shape) == 1:
            v = v.reshape(-1)
        if ph is not None:
            v = gguf_unpermute(v, ph)
        state[hf] = torch.from_numpy(np.array(v))
    if refused and unsupported == "error":
        raise ValueError(
            f"{path}: qkern cannot run these GGUF tensors exactly:\n  "
            + "\n  ".join(refused[:6]) + (f"\n  (and {len(refused) - 6} more)"
                                          if len(refused) > 6 else "")
            + "\nqkern holds Q4_0, Q5_0, Q8_0, Q6_K exactly (int4/int5/int8 groups of 32, int6 "
            "groups of 16), and Q4_1/Q5_1/Q4_K/Q5_K when their mins are integer multiples of "
            "their scales. Pass unsupported='float' to load these as float weights (the exact "
            "GGUF values, computed in float)")
    biases = {t.name.split(".")[-2] for t in r.tensors if t.name.endswith(".bias")}
    if biases and backend == "qkern":
        raise ValueError(f"{path}: biases ({', '.join(sorted(biases))}) need "
                         "backend='transformers'")
    model = _build(hp, backend, biases).eval()
    if hp.tie_word_embeddings and backend == "qkern":
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    quant_weights = {f"{n}.weight" for n in quant}
    missing = [m for m in missing if m not in quant_weights
               and not (m == "lm_head.weight" and hp.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:6]}, unexpected {unexpected[:6]}")
    for name, q in quant.items():
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, QuantLinear(
            q, None if getattr(old, "bias", None) is None else state.get(f"{name}.bias")))
    return model
