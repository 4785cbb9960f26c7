"""GGUF, llama.cpp's single-file format, written and read with the ``gguf`` package.

``qkern.export(model, "out.gguf", format="gguf", type="Q4_0")`` writes a Llama (transformers
``LlamaForCausalLM`` or qkern's ``models.llama.Llama``, float or qkern-quantized) as one
``.gguf`` file for llama.cpp: the llama architecture's metadata, a tokenizer table (byte-level
models: 256 byte tokens, :func:`.gguf_arch.byte_tokens`), and the tensors under llama.cpp's
names (``token_embd``, ``blk.N.attn_q`` ...), the q/k projection rows permuted as llama.cpp's
``convert_hf_to_gguf.py`` (``LlamaModel.permute``) does.

The block linears are written in ``type``. A qkern layer whose codes the type holds keeps them
(:func:`.gguf_blocks.legacy_blocks`): int4 (or uint4 with zero point 8) -> Q4_0 ``d * (u - 8)``,
int4 / uint4 with zero points -> Q4_1 ``d * u + m`` (m = -d * z), int5 / uint5 -> Q5_0 / Q5_1,
int8 -> Q8_0 ``d * q``, in groups of a multiple of 32 or per output channel (the scale repeated
over the 32-blocks); int6 in groups of 16 with scales ``d * sc`` -> Q6_K. That is bit-exact
when the scales (and mins) are fp16 numbers, and otherwise the same codes with the scales rounded
to fp16 (relative change <= 2^-11; reported by a warning, refused with ``exact=True``). A layer
no type holds is requantized from qkern's dequantized weight with the type's own rule (also
warned): ``gguf.quants.quantize`` for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/BF16, :mod:`.gguf_blocks`
(ggml's reference rows) for Q4_K/Q6_K. Float layers are quantized the same way. Rows a type
cannot split (K-quants need a multiple of 256, the others of 32) take llama.cpp's fallback
(Q4_K -> Q5_0, Q6_K -> Q8_0, else F16). Embeddings, norms and a float LM head stay F32.

``qkern.from_pretrained("x.gguf")`` reads a llama-architecture GGUF back onto qkern exactly
(:mod:`.gguf_load`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._checks import warn_user
from ..nn import QuantLinear
from . import Format, register
from .gguf_arch import LINEARS, NORMS, Hparams, byte_tokens, gguf_permute
from .gguf_blocks import LEGACY, legacy_blocks, q6_k_exact, quantize_q4_k, quantize_q6_k
from .gguf_load import load_gguf

try:
    import gguf as G
    from gguf.quants import quantize as gguf_quantize
except ImportError as e:  # pragma: no cover - gguf is a dependency of the interop extra
    raise ImportError("GGUF export/import needs the gguf package: pip install gguf") from e

__all__ = ["GGUF", "TYPES"]

T = G.GGMLQuantizationType
#: the types ``type=`` takes
TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K")
_FILE_TYPE = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
              "Q8_0": "MOSTLY_Q8_0", "Q4_K": "MOSTLY_Q4_K_S", "Q6_K": "MOSTLY_Q6_K"}
# llama.cpp (llama-quant.cpp): a row a K-quant cannot split into 256s takes a legacy type
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


# ---------------------------------------------------------------- export: one linear weight

def _quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    if qtype == "Q4_K":
        return quantize_q4_k(w)
    if qtype == "Q6_K":
        return quantize_q6_k(w)
    return gguf_quantize(w, T[qtype])


def _fits(qtype: str, k: int) -> bool:
    if qtype in ("F32", "F16", "BF16"):
        return True
    return k % G.GGML_QUANT_SIZES[T[qtype]][0] == 0


def _encode(layer: nn.Module, qtype: str) -> tuple[np.ndarray, str, str]:
    """(data, GGUF type written, how) of a linear; how: "exact" (qkern's codes and scales bit
    for bit), "fp16 scales" (qkern's codes, scales rounded to fp16), "requantized" (qkern's
    dequantized weight quantized with the type's rule), "quantized" (a float layer). A row
    length the type cannot split takes llama.cpp's fallback type."""
    k = layer.in_features
    t = qtype
    if not _fits(t, k):
        t = _FALLBACK.get(t, "F16")
        if not _fits(t, k):
            t = "F16"
    if isinstance(layer, QuantLinear):
        q = layer.quantized_weight()
        got = q6_k_exact(q) if t == "Q6_K" else legacy_blocks(q, t) if t in LEGACY else None
        if got is not None:
            return got[0], t, "fp16 scales" if got[1] else "exact"
        w, how = layer.dequantize_weight().detach().float().numpy(), "requantized"
    else:
        w, how = layer.weight.detach().float().cpu().numpy(), "quantized"
    if t == "F32":
        return np.ascontiguousarray(w, np.float32), t, how
    if t == "F16":
        return w.astype(np.float16), t, how
    return _quantize(np.ascontiguousarray(w, np.float32), t), t, how


# ---------------------------------------------------------------- export: the file

def _add_vocab(w: G.GGUFWriter, hp: Hparams, vocab: str) -> None:
    if vocab == "auto":
        if hp.vocab_size != 256:
            raise ValueError(f"GGUF export: the model's vocabulary has {hp.vocab_size} tokens; "
                             "qkern writes the table of byte-level models (256 tokens) only. "
                             "Pass vocab='none' to write no tokenizer (llama.cpp then takes "
                             "token ids only)")
        vocab = "bytes"
    if vocab == "none":
        w.add_tokenizer_model("none")
        return
    if vocab != "bytes":
        raise ValueError(f"vocab must be 'auto', 'bytes' or 'none', got {vocab!r}")
    if hp.vocab_size != 256:
        raise ValueError(f"vocab='bytes' needs a vocabulary of 256 tokens, got {hp.vocab_size}")
    # llama.cpp's BPE tokenizer over the 256 byte tokens: words are byte-mapped, split into
    # single characters (each a token); the one merge joins two-character symbols, which never
    # exist, so no merge applies and token id = byte value (gguf cannot store an empty list)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(byte_tokens())
    w.add_token_types([int(G.TokenType.NORMAL)] * 256)
    w.add_token_merges(["\u0120\u0120 \u0120\u0120"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"GGUF export: the model has no {name!r} (a Llama has "
                         "model.embed_tokens, model.layers.N.self_attn.q_proj, ..., lm_head)")


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy(), np.float32)


def _tensors(model: nn.Module, hp: Hparams, qtype: str):
    """(gguf name, data, GGUF type, how) of every tensor, in llama.cpp's order."""
    emb = _module(model, "model.embed_tokens")
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"GGUF export: model.embed_tokens is a {type(emb).__name__}; a float "
                         "nn.Embedding is written (keep the embeddings unquantized)")
    yield "token_embd.weight", _f32(emb.weight), "F32", "float"
    for i in range(hp.num_hidden_layers):
        pre = f"model.layers.{i}"
        for hf, gg in NORMS.items():
            yield f"blk.{i}.{gg}.weight", _f32(_module(model, f"{pre}.{hf}").weight), "F32", \
                "float"
        for hf, gg in LINEARS.items():
            layer = _module(model, f"{pre}.{hf}")
            if not isinstance(layer, (nn.Linear, QuantLinear)):
                raise ValueError(f"GGUF export: {pre}.{hf} is a {type(layer).__name__}, not a "
                                 "Linear or QuantLinear")
            data, t, how = _encode(layer, qtype)
            bias = None if layer.bias is None else _f32(layer.bias)
            heads = {"attn_q": hp.num_attention_heads, "attn_k": hp.num_key_value_heads}
            if gg in heads:
                data = gguf_permute(data, heads[gg])
                bias = None if bias is None else gguf_permute(bias, heads[gg])
            yield f"blk.{i}.{gg}.weight", data, t, how
            if bias is not None:
                yield f"blk.{i}.{gg}.bias", bias, "F32", "float"
    yield "output_norm.weight", _f32(_module(model, "model.norm").weight), "F32", "float"
    if not hp.tie_word_embeddings:
        head = _module(model, "lm_head")
        if isinstance(head, QuantLinear):
            data, t, how = _encode(head, qtype)
            yield "output.weight", data, t, how
        else:
            yield "output.weight", _f32(head.weight), "F32", "float"


def _write_file(model: nn.Module, path: Path, qtype: str, vocab: str, exact: bool,
                name: str | None) -> list[tuple[str, str, str]]:
    hp = Hparams.of(model)
    w = G.GGUFWriter(path, "llama")
    w.add_name(name or "qkern model")
    w.add_context_length(hp.max_position_embeddings)
    w.add_embedding_length(hp.hidden_size)
    w.add_block_count(hp.num_hidden_layers)
    w.add_feed_forward_length(hp.intermediate_size)
    w.add_head_count(hp.num_attention_heads)
    w.add_head_count_kv(hp.num_key_value_heads)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.num_attention_heads != hp.hidden_size:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_layer_norm_rms_eps(hp.rms_norm_eps)
    w.add_vocab_size(hp.vocab_size)
    w.add_file_type(int(G.LlamaFileType[_FILE_TYPE[qtype]]))
    w.add_quantization_version(G.GGML_QUANT_VERSION)
    _add_vocab(w, hp, vocab)
    acts = sorted({m.act for m in model.modules() if isinstance(m, QuantLinear)} - {"none"})
    if acts:
        warn_user(f"GGUF export: activation quantization ({', '.join(acts)}) is not part of "
                  "GGUF; the weights are written, llama.cpp quantizes activations its own way")
    log, inexact = [], []
    for tname, data, t, how in _tensors(model, hp, qtype):
        raw = None if t in ("F32", "F16") else T[t]
        w.add_tensor(tname, data, raw_dtype=raw)
        log.append((tname, t, how))
        if how in ("requantized", "fp16 scales"):
            inexact.append(f"{tname} ({t}: {how})")
    if inexact and exact:
        raise ValueError(f"GGUF export with exact=True: these quantized layers do not fit "
                         f"{qtype} bit-exactly: {', '.join(inexact)}. Exact: int4 (or uint4 with "
                         "zero point 8) -> Q4_0, uint4 -> Q4_1, int5/uint5 -> Q5_0/Q5_1, int8 -> "
                         "Q8_0, in groups of a multiple of 32 or per output channel, with scales "
                         "(and Q4_1/Q5_1 mins -scale*zero) that fp16 holds; int6 groups of 16 "
                         "with scales d*sc -> Q6_K")
    if inexact:
        warn_user(f"GGUF export: {len(inexact)} quantized layer(s) are not held bit-exactly by "
                  f"{qtype}: {', '.join(inexact[:3])}{' ...' if len(inexact) > 3 else ''} "
                  "('fp16 scales': qkern's codes with the scales rounded to fp16, relative "
                  "change <= 2^-11; 'requantized': qkern's dequantized weight quantized again "
                  "with the type's rule). exact=True refuses them")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return log


@register
class GGUF(Format):
    """``format="gguf"``: one ``.gguf`` file for llama.cpp (see the module docstring)."""

    name = "gguf"

    def write(self, model: nn.Module, out: Path, type: str = "Q4_0", overwrite: bool = False,
              exact: bool = False, vocab: str = "auto", name: str | None = None,
              **options) -> Path:
        """Writes ``model`` to the file ``out``; ``type``: one of :data:`TYPES` for the block
        linears; ``exact=True`` refuses quantized layers the type cannot hold bit-exactly
        instead of requantizing them; ``vocab``: "auto" (the 256-byte table for vocab 256),
        "bytes" or "none"."""
        if options:
            raise TypeError(f"GGUF export: unknown options {sorted(options)}")
        if type not in TYPES:
            raise ValueError(f"type must be one of {', '.join(TYPES)}, got {type!r}")
        out = Path(out)
        if out.is_dir():
            raise ValueError(f"{out} is a directory; GGUF is one file (e.g. {out}/model.gguf)")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"{out.parent} is not a directory")
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".qkern-tmp", dir=out.parent)
        os.close(fd)
        try:
            _write_file(model, Path(tmp), type, vocab, exact, name)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out

    def detect(self, path: Path) -> bool:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"

    def load(self, path: Path, backend: str = "transformers", unsupported: str = "error",
             **options) -> nn.Module:
        """The GGUF file's llama model: ``backend`` "transformers" (LlamaForCausalLM) or
        "qkern" (``qkern.models.llama.Llama``); ``unsupported="float"`` loads the types qkern
        cannot hold exactly as float weights instead of refusing them."""
        if options:
            raise TypeError(f"GGUF import: unknown options {sorted(options)}")
        if not self.detect(path):
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
        return load_gguf(Path(path), backend, unsupported)
