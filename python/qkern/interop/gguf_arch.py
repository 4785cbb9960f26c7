"""The llama architecture as GGUF holds it: hyperparameters (``llama.*`` keys), llama.cpp's
tensor names, the q/k row permutation of ``convert_hf_to_gguf.py``, the byte-level token
table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..models.llama import Llama as QLlama
from ..models.llama import LlamaConfig as QLlamaConfig

try:
    import gguf as G
except ImportError as e:  # pragma: no cover - gguf is a dependency of the interop extra
    raise ImportError("GGUF export/import needs the gguf package: pip install gguf") from e

__all__ = ["LINEARS", "NORMS", "Hparams", "byte_tokens", "gguf_permute", "gguf_unpermute",
           "field", "read_hparams"]

# HF module suffix -> llama.cpp tensor name (blk.N.<name>)
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


@dataclass(frozen=True)
class Hparams:
    """The llama architecture's hyperparameters, as GGUF's ``llama.*`` keys hold them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def of(cls, model: nn.Module) -> Hparams:
        """From a transformers Llama's config or qkern's Llama (ValueError for others)."""
        cfg = getattr(model, "config", None)
        if isinstance(model, QLlama):
            c: QLlamaConfig = model.config
            return cls(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                       c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                       c.max_position_embeddings, c.rms_norm_eps, c.rope_theta,
                       c.tie_word_embeddings)
        if getattr(cfg, "model_type", None) != "llama" or not hasattr(model, "lm_head"):
            raise ValueError("GGUF export writes llama.cpp's llama architecture: it takes a "
                             "transformers LlamaForCausalLM or qkern.models.llama.Llama, got "
                             f"{type(model).__name__} (model_type "
                             f"{getattr(cfg, 'model_type', None)!r})")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"GGUF export: rope scaling {rope!r} is not supported (default "
                             "rope only)")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"GGUF export: hidden_act {cfg.hidden_act!r} (llama is silu)")
        heads = cfg.num_attention_heads
        return cls(cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
                   cfg.num_hidden_layers, heads, cfg.num_key_value_heads or heads,
                   getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   cfg.max_position_embeddings, float(cfg.rms_norm_eps),
                   float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
                   bool(getattr(cfg, "tie_word_embeddings", False)))


def gguf_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (``LlamaModel.permute``): within each head, the rotate-half
    pairs (i, i + d/2) of transformers become adjacent rows (2i, 2i + 1)."""
    n = rows.shape[0]
    return (rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).swapaxes(1, 2)
            .reshape(rows.shape))


def gguf_unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    n = rows.shape[0]
    return (rows.reshape(n_head, n // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2)
            .reshape(rows.shape))


def byte_tokens() -> list[str]:
    """The 256 tokens of a byte-level vocabulary (token id = byte value) in the GPT-2 byte ->
    unicode mapping that llama.cpp's BPE tokenizer ("gpt2") decodes: printable bytes stand for
    themselves, the others map to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def field(r: G.GGUFReader, key: str, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def read_hparams(r: G.GGUFReader, path: Path) -> Hparams:
    """The llama hyperparameters of a GGUF file (ValueError for another architecture)."""
    arch = field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r}; qkern loads 'llama' only")
    names = {t.name for t in r.tensors}
    need = ["llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
            "llama.attention.head_count"]
    missing = [k for k in need if k not in r.fields]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    if "token_embd.weight" not in names:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight")
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    hidden, heads = int(field(r, "llama.embedding_length")), \
        int(field(r, "llama.attention.head_count"))
    scaling = field(r, "llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and float(
            field(r, "llama.rope.scaling.factor", 1.0)) != 1.0):
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported")
    head_dim = int(field(r, "llama.attention.key_length", hidden // heads))
    if int(field(r, "llama.attention.value_length", head_dim)) != head_dim or int(
            field(r, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path}: value length or rope dimension count differs from the head "
                         f"size {head_dim} (partial rotary): not supported")
    return Hparams(int(field(r, "llama.vocab_size", int(emb.shape[1]))), hidden,
                   int(field(r, "llama.feed_forward_length")),
                   int(field(r, "llama.block_count")), heads,
                   int(field(r, "llama.attention.head_count_kv", heads)),
                   head_dim,
                   int(field(r, "llama.context_length", 2048)),
                   float(field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
                   float(field(r, "llama.rope.freq_base", 10000.0)),
                   "output.weight" not in names)



