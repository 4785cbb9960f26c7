"""Tiny random transformers models of each architecture the LLM pipeline supports, built
from a config (nothing fetched), for the LLM-method tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96


def _llama_like(cls_cfg, cls_model, **extra):
    cfg = cls_cfg(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  **extra)
    return cls_model(cfg)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model (eval mode) of ``arch``."""
    T = transformers
    torch.manual_seed(seed)
    if arch == "llama":
        m = _llama_like(T.LlamaConfig, T.LlamaForCausalLM)
    elif arch == "llama-mha":
        m = T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))
    elif arch == "mistral":
        m = _llama_like(T.MistralConfig, T.MistralForCausalLM)
    elif arch == "qwen2":
        m = _llama_like(T.Qwen2Config, T.Qwen2ForCausalLM)
    elif arch == "qwen3":
        m = _llama_like(T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=16)
    elif arch == "opt":
        m = T.OPTForCausalLM(T.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128))
    elif arch == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                           n_positions=128, bos_token_id=0, eos_token_id=0))
    elif arch == "bert":
        m = T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=128))
    else:
        raise KeyError(arch)
    return m.eval()


ARCHS = ("llama", "llama-mha", "mistral", "qwen2", "qwen3", "opt", "gpt2", "bert")


def calibration(n: int = 4, length: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, length), generator=g) for _ in range(n)]


def output(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (causal LMs) or the last hidden state (BERT)."""
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
