"""A minimal Llama (Hugging Face ``LlamaForCausalLM`` weights and config) in plain torch.

Enough for the small checkpoints shipped with qkern (``models/wikitext-bytelm``,
``models/stories260k``): RMSNorm, rotate-half RoPE, multi-head attention with grouped KV heads
and a KV cache, SwiGLU MLP. Every projection is an ``nn.Linear`` named as in transformers
(``model.layers.0.self_attn.q_proj`` ...), so ``qkern.nn.replace_linear`` quantizes it and
the state dict loads straight from ``model.safetensors``::

    model = load_llama("models/wikitext-bytelm")
    qmodel = qkern.nn.replace_linear(model, {"fmt": "int4", "group_size": 32})
    bpb = bits_per_byte(qmodel, open("data/wikitext-2/wiki.test.tokens", "rb").read())
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io.shards import checkpoint_files, read_checkpoint
from ..ops.decode import attention_step, rms_norm, silu_mul

__all__ = ["INDEX_FILE", "KVCache", "Llama", "LlamaConfig", "bits_per_byte", "load_llama",
           "read_weights", "weight_files"]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        arch = d.get("architectures") or ["LlamaForCausalLM"]
        if "LlamaForCausalLM" not in arch:
            raise ValueError(f"not a Llama checkpoint: architectures={arch}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (silu only)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {rope!r} is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        heads = d["num_attention_heads"]
        if d.get("head_dim", d["hidden_size"] // heads) * heads != d["hidden_size"]:
            raise ValueError("head_dim * num_attention_heads != hidden_size is not supported")
        return cls(d["vocab_size"], d["hidden_size"], d["intermediate_size"],
                   d["num_hidden_layers"], heads, d.get("num_key_value_heads", heads),
                   d.get("max_position_embeddings", 2048), d.get("rms_norm_eps", 1e-5),
                   float(theta), bool(d.get("tie_word_embeddings", False)))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Keys and values of the positions seen so far, (batch, kv_heads, max_len, head_dim) per
    layer, preallocated; ``pos`` is the number of positions filled."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype=torch.float32):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len, self.pos = max_len, 0


def _rope_tables(cfg: LlamaConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    ang = torch.outer(torch.arange(n, dtype=torch.int64).float(), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        self.cfg = cfg
        # None: torch's scaled_dot_product_attention; else attn_fn(self, q, k, v, keep) -> the
        # (b, heads, t, head_dim) output, k / v as attended (after the cache, repeated to the
        # query heads), keep (t, positions) bool, True where a query may attend a key (QAT's
        # fake-quantized attention sets it)
        self.attn_fn = None

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int):
        b, t, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            p = cache.pos
            cache.k[layer][:, :, p:p + t] = k
            cache.v[layer][:, :, p:p + t] = v
            k, v = cache.k[layer][:, :, :p + t], cache.v[layer][:, :, :p + t]
        rep = c.num_attention_heads // c.num_key_value_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if cache is not None and cache.pos > 0 and t > 1:
            raise NotImplementedError("chunked prefill after the first chunk")
        # causal over the new positions; every cached position is visible to all of them
        if self.attn_fn is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or cache.pos == 0)
        else:
            p0 = k.shape[2] - t  # positions before the new ones
            keep = (torch.arange(k.shape[2], device=q.device)
                    <= p0 + torch.arange(t, device=q.device).unsqueeze(1))
            y = self.attn_fn(self, q, k, v, keep)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Body(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """``forward(ids (B, T) int64, cache=None) -> logits (B, T, vocab)``. With a
    :class:`KVCache`, the positions continue from ``cache.pos`` (which then advances)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = _Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = _rope_tables(cfg, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be integer (batch, seq), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        t = ids.shape[1]
        p = 0 if cache is None else cache.pos
        limit = self.config.max_position_embeddings if cache is None else cache.max_len
        if p + t > min(limit, self.config.max_position_embeddings):
            raise ValueError(f"sequence of {p + t} positions exceeds the limit {limit}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        h = self.model.embed_tokens(ids)
        if t == 1 and cache is not None:
            plan = self._fused_plan(h, cache)
            if plan is not None:
                return self._fused_step(plan, h, cache)
        cos, sin = self.rope_cos[p:p + t].to(h.dtype), self.rope_sin[p:p + t].to(h.dtype)
        for i, blk in enumerate(self.model.layers):
            h = blk(h, cos, sin, cache, i)
        if cache is not None:
            cache.pos += t
        return self.lm_head(self.model.norm(h))

    #: decode one position at a time through qkern.ops.decode's kernels (one call per norm,
    #: attention and SwiGLU instead of ~25 torch ops per layer) where _fused_plan allows;
    #: False keeps every step on the modules' own forwards
    fused_decode: bool = True

    def _fused_plan(self, h: torch.Tensor, cache: KVCache) -> tuple | None:
        """What the fused step calls: (the first norm's weight and eps, per layer its seven
        projections and two norms' weights and eps), when it computes what the modules'
        forwards do: float32 CPU inference (no grad, no tracing) through this file's plain
        modules, none of them hooked (the projections are called as modules, so their hooks and
        wrappers run); else None. Reads the modules' own dicts (~10x faster than attribute
        lookups through nn.Module.__getattr__: this runs once per token)."""
        if not self.fused_decode or torch.is_grad_enabled() or h.dtype is not torch.float32 \
                or not h.is_cpu or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        glob = nn.modules.module
        if glob._global_forward_hooks or glob._global_forward_pre_hooks:
            return None

        def plain(m, kind) -> bool:
            return type(m) is kind and not m._forward_hooks and not m._forward_pre_hooks

        def norm(m) -> tuple | None:
            w = m._parameters["weight"] if plain(m, RMSNorm) else None
            ok = w is not None and w.dtype is torch.float32 and w.is_cpu and w.is_contiguous()
            return (w, m.eps) if ok else None

        body = self.model._modules
        blocks = list(body["layers"]._modules.values())
        norms = [blk._modules.get("input_layernorm") for blk in blocks] + [body["norm"]]
        steps = []
        for i, blk in enumerate(blocks):
            if not plain(blk, Block):
                return None
            m = blk._modules
            a, mlp = m["self_attn"], m["mlp"]
            if not plain(a, Attention) or a.attn_fn is not None or not plain(mlp, MLP):
                return None
            n1, n2 = norm(m["post_attention_layernorm"]), norm(norms[i + 1])
            if n1 is None or n2 is None:
                return None
            am, mm = a._modules, mlp._modules
            steps.append((am["q_proj"], am["k_proj"], am["v_proj"], am["o_proj"],
                          mm["gate_proj"], mm["up_proj"], mm["down_proj"]) + n1 + n2)
        first = norm(norms[0])
        for c in cache.k + cache.v:
            if c.dtype is not torch.float32 or not c.is_cpu or not c.is_contiguous():
                return None
        ok = first is not None and self.rope_cos.dtype is torch.float32
        return (first, steps) if ok else None

    def _fused_step(self, plan: tuple, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Llama.forward of one position per sequence (h: (batch, 1, hidden) embeddings) with
        the norms, RoPE + attention over the cache and SiLU(gate) * up as single kernels, each
        residual add fused into the norm after it."""
        p = cache.pos
        cos, sin = self.rope_cos[p], self.rope_sin[p]

        def f32(t: torch.Tensor) -> torch.Tensor:
            ok = t.dtype is torch.float32 and t.is_contiguous()
            return t if ok else t.float().contiguous()

        (w0, eps0), steps = plan
        h = f32(h)
        x = rms_norm(h, w0, eps0)
        for i, (q, k, v, o, gate, up, down, w1, eps1, w2, eps2) in enumerate(steps):
            y = attention_step(f32(q(x)), f32(k(x)), f32(v(x)), cos, sin, cache.k[i],
                               cache.v[i], p)
            x, h = rms_norm(f32(o(y)), w1, eps1, residual=h)
            x, h = rms_norm(f32(down(silu_mul(f32(gate(x)), f32(up(x))))), w2, eps2,
                            residual=h)
        cache.pos += 1
        return self.lm_head(x)

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
        """Greedy decode of ``n_new`` tokens after ``prompt`` (1-D ids) with a KV cache."""
        ids = prompt.reshape(1, -1).long()
        dtype = next((t.dtype for t in self.parameters() if t.is_floating_point()),
                     torch.float32)
        cache = KVCache(self.config, 1, ids.shape[1] + n_new, dtype=dtype)
        logits = self(ids, cache)
        out = []
        for _ in range(n_new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = self(nxt, cache)
        return torch.cat(out, dim=1).reshape(-1) if out else ids.new_empty(0)


INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder: the shards ``model.safetensors.index.json``
    names (each must be there), else ``model.safetensors``, else every ``*.safetensors``
    (:func:`qkern.io.shards.checkpoint_files`)."""
    return checkpoint_files(path)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors files (memory-mapped; see
    :func:`weight_files`); a name in two files is a ValueError
    (:func:`qkern.io.shards.read_checkpoint`)."""
    return read_checkpoint(path)


def load_llama(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> Llama:
    """A :class:`Llama` from a folder holding ``config.json`` and its weights: one
    ``model.safetensors``, or shards with ``model.safetensors.index.json`` (as transformers'
    ``save_pretrained(max_shard_size=...)`` writes), or several ``*.safetensors``.

    ``dtype``: the model's float dtype; float16 / bfloat16 weights become float32 exactly
    (the default, what qkern's quantizers take); None keeps the checkpoint's dtype (all its
    float tensors must share one); a narrower dtype than the file's rounds the weights."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: expected config.json (and model.safetensors or "
                                f"{INDEX_FILE}) there")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {_FLOAT_DTYPES} or None, got {dtype!r}")
    cfg = LlamaConfig.from_dict(json.loads((p / "config.json").read_text()))
    sd = read_weights(p)
    kinds = {t.dtype for t in sd.values() if t.is_floating_point()}
    if dtype is None:
        if len(kinds) != 1:
            raise ValueError(f"{p}: the checkpoint mixes float dtypes {sorted(map(str, kinds))};"
                             " pass dtype= to convert them to one")
        dtype = kinds.pop()
    if cfg.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model = Llama(cfg).to(dtype)
    model.rope_cos, model.rope_sin = _rope_tables(cfg, cfg.max_position_embeddings)  # float32
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{p}: state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


@torch.inference_mode()
def bits_per_byte(model: Llama, data: bytes, window: int = 256, n_windows: int = 48,
                  batch: int = 16) -> float:
    """Mean next-byte cross-entropy in bits over the first ``n_windows`` non-overlapping
    windows of ``window`` bytes (each window predicts its bytes 1..window-1 from the prefix)."""
    if model.config.vocab_size < 256:
        raise ValueError("bits_per_byte needs a byte-level model (vocab >= 256)")
    n = min(n_windows, len(data) // window)
    if n == 0:
        raise ValueError(f"need at least {window} bytes of text, got {len(data)}")
    ids = torch.frombuffer(bytearray(data[:n * window]), dtype=torch.uint8).long().view(n, window)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = ids[i:i + batch]
        logits = model(x).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                              x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return total / count / math.log(2)
