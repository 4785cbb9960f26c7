"""Randomized Hadamard rotations before quantization (QuaRot, arXiv:2404.00456; SpinQuant,
arXiv:2405.16406 with a fixed random Hadamard instead of a learned rotation).

For an orthogonal ``R``, ``x W^T = (x R)(W R)^T``: rotating a linear's input columns and its
input activations by the same ``R = diag(s) H^T / sqrt(n)`` (``H`` Hadamard, ``s`` random
signs applied before the transform mixes the channels; ``R = Q^T`` for
``Q = qkern.hadamard.random_hadamard(n, seed)``) leaves the block's function unchanged,
while outlier channels of ``x`` and ``W`` are spread over all ``n`` channels (incoherence),
so both quantize with smaller error — the reason rotations enable W4A8 / W4A4 and better
2–3-bit weights.

Per Llama-style block (RMSNorm -> q/k/v, RMSNorm -> gate/up; transformers Llama / Mistral /
Qwen2 / Qwen3 and ``qkern.models.llama``), in :func:`rotate_block`:

1. each RMSNorm's weight is folded into the following linears' input columns
   (``W <- W diag(w)``, ``w <- 1``): the norm becomes weight-free, and RMSNorm commutes with
   any orthogonal ``R`` (``||x R|| = ||x||``);
2. q/k/v and gate/up get ``W <- W R`` and the norm's output is rotated online by ``R``
   (:class:`~qkern.nn.HadamardOutput`); o_proj and down_proj get ``W <- W R`` with their input
   rotated online (:class:`~qkern.nn.HadamardInput`). Every online rotation is the fast
   Walsh-Hadamard kernel (``qkern::fwht``, O(n log n)) over the ``2^k`` factor of ``n`` and a
   dense ``m x m`` product for ``n = 2^k m`` (``qkern.hadamard``).

The residual stream itself stays in the original basis (QuaRot rotates it once for the whole
model, folding ``R`` into the embeddings and the LM head): the pipeline works one block at a
time and never sees those, so every rotation here is inside a block — two more online
transforms per block than QuaRot (the two norms), each O(n log n) against the block's O(n^2)
matmuls.

Any other block (OPT, GPT-2, BERT: LayerNorm, whose mean subtraction and bias do not commute
with a rotation of its INPUT) is rotated by :func:`_rotate_any_block`: each norm whose output
feeds only linears (:func:`foldable_norms`: pre-LN OPT and GPT-2) has its gain and bias folded
into them (``W <- W diag(g)``, ``b <- b + W beta``; ``g <- 1``, ``beta <- 0``), their input
columns get ``W <- W R`` and the norm's OUTPUT is rotated online (exact: the mean subtraction
happens before); every other linear of the block (o / out_proj, fc2, GPT-2's c_proj, all of
post-LN BERT's) gets ``W <- W R`` and an online rotation of its input
(:class:`~qkern.nn.HadamardInput`). :func:`rotate_model` stays Llama-only.

``RotationConfig(then=GPTQConfig(...))`` hands the rotated layers to another LLM method;
without ``then`` they are rounded to nearest. ``act_bits=8`` quantizes every quantized layer's
input activations to int8 too (:func:`a8_linear`: per token for int8 weights, per block of 32
along K on the int2-4 ``fast`` kernels: W4A8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...hadamard import base_order, random_signs
from ...nn import QuantLinear
from ...nn.hadamard import HadamardInput, HadamardOutput, rotate
from ..blocks import block_linears, find_blocks, is_norm, linearize_conv1d, scale_pairs
from ..constraints import check_dynamic_activations
from ..registry import BaseConfig, check_bool, check_int, config_class, fail, register_quantizer
from ..sequential import BlockContext, SequentialQuantizer, check_weight_bits

__all__ = ["NORM_SITES", "ONLINE_SITES", "RotationConfig", "RotationQuantizer", "a8_linear",
           "foldable_norms", "rotate_block", "rotate_model"]

#: (RMSNorm, the linears reading its output) of a Llama-style block
NORM_SITES = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
#: linears whose input is rotated online (their input is not a module's output)
ONLINE_SITES = ("self_attn.o_proj", "mlp.down_proj")


@config_class
@dataclass
class RotationConfig(BaseConfig):
    """Hadamard rotation (``seed`` picks the random signs; ``random_signs=False``: the plain
    normalized Hadamard ``H^T / sqrt(n)``), then ``bits`` / ``group_size`` /
    ``sym`` weights by ``then`` (an LLM method config with the same three fields; None: round
    to nearest) and, with ``act_bits=8``, int8 dynamic activations (:func:`a8_linear`)."""

    bits: int = 4
    group_size: int | None = 128
    sym: bool = True
    seed: int = 0
    random_signs: bool = True
    act_bits: int | None = None
    then: BaseConfig | None = None

    def __post_init__(self) -> None:
        check_weight_bits(self)
        check_int(type(self).__name__, "seed", self.seed, 0)
        check_bool(type(self).__name__, "random_signs", self.random_signs)
        if self.act_bits not in (None, 8) or isinstance(self.act_bits, bool):
            fail(type(self).__name__, "act_bits", "None (weight-only) or 8 (W{bits}A8)",
                 self.act_bits)
        super().__post_init__()


def _llama_style(block: nn.Module) -> None:
    """Raises ValueError unless ``block`` has the RMSNorm -> linears structure rotated here."""
    mods = dict(block.named_modules())
    kind = type(block).__name__
    for norm, lins in NORM_SITES:
        m = mods.get(norm)
        if m is None or not is_norm(m):
            break
        if isinstance(m, nn.LayerNorm) or getattr(m, "bias", None) is not None:
            raise ValueError(
                f"RotationConfig: {kind}.{norm} is a LayerNorm (mean subtraction and a bias do "
                "not commute with a rotation); Llama-style RMSNorm blocks only (Llama, Mistral, "
                "Qwen2, Qwen3, qkern.models.llama)")
        if any(type(mods.get(n)) is not nn.Linear for n in lins):
            break
    else:
        if all(type(mods.get(n)) is nn.Linear for n in ONLINE_SITES):
            return
    raise ValueError(
        f"RotationConfig: {kind} is not a Llama-style block (input_layernorm -> q/k/v_proj, "
        "o_proj, post_attention_layernorm -> gate/up_proj, down_proj); supported: Llama, "
        "Mistral, Qwen2, Qwen3, qkern.models.llama. OPT, GPT-2 and BERT use LayerNorm (mean "
        "subtraction, bias), which a rotation does not commute with")


def _rotate_columns(lin: nn.Linear, signs: torch.Tensor) -> None:
    """``W <- W R`` (each row times R, as the online rotation of its input): the input
    columns rotated."""
    with torch.no_grad():
        w = lin.weight
        w.copy_(rotate(w.detach().float(), signs).to(w.dtype))


def _site_signs(n: int, seed: int | None, index: int, site: int) -> torch.Tensor | None:
    try:
        base_order(n)
    except ValueError:
        return None
    if seed is None:
        return torch.ones(n)
    return random_signs(n, seed * 1_000_003 + index * 16 + site)


def rotate_block(block: nn.Module, seed: int | None = 0, index: int = 0,
                 notes: dict[str, str] | None = None, name: str = "") -> dict[str, str]:
    """Rotates a Llama-style ``block`` in place (see the module docstring); the block computes
    the same function (up to float rounding). ``seed`` (with the block's ``index``) picks the
    random signs of each rotation; None: all +1 (the plain Hadamard). Returns ``{old name:
    new name}`` of the linears now wrapped by :class:`~qkern.nn.HadamardInput`
    (``x.o_proj`` -> ``x.o_proj.linear``). A
    site whose size has no Hadamard matrix (``qkern.hadamard.base_order``) is left as it is,
    with a note in ``notes``."""
    notes = {} if notes is None else notes
    try:
        _llama_style(block)
    except ValueError:
        return _rotate_any_block(block, seed, index, notes, name)
    return _rotate_sites(block, list(NORM_SITES), list(ONLINE_SITES), _fold_norm, seed, index,
                         notes, name)


def _rotate_sites(block: nn.Module, norms: list, online: list[str], fold, seed: int | None,
                  index: int, notes: dict[str, str], name: str) -> dict[str, str]:
    """Each (norm, linears) site of ``norms``: ``fold(norm, linears)``, the linears' input
    columns rotated and the norm's output rotated online; each linear of ``online``: its
    columns and its input rotated. Returns the renames of the linears now inside a
    HadamardInput."""
    site = 0
    for norm_name, lin_names in norms:
        norm = block.get_submodule(norm_name)
        lins = [block.get_submodule(n) for n in lin_names]
        fold(norm, lins)
        n = norm.weight.numel()
        signs = _site_signs(n, seed, index, site)
        site += 1
        if signs is None:
            notes[f"{name}.{norm_name}"] = (f"no Hadamard matrix of size {n}: norm folded, not "
                                            "rotated")
            continue
        for lin in lins:
            _rotate_columns(lin, signs)
        _replace(block, norm_name, HadamardOutput(norm, signs))
    renames = {}
    for lin_name in online:
        lin = block.get_submodule(lin_name)
        signs = _site_signs(lin.in_features, seed, index, site)
        site += 1
        if signs is None:
            notes[f"{name}.{lin_name}"] = (f"no Hadamard matrix of size {lin.in_features}: "
                                           "input not rotated")
            continue
        _rotate_columns(lin, signs)
        _replace(block, lin_name, HadamardInput(lin, signs))
        renames[lin_name] = f"{lin_name}.linear"
    return renames


def foldable_norms(block: nn.Module) -> list[tuple[str, list[str]]]:
    """The (norm, linears) pairs of :func:`~qkern.quantization.scale_pairs` whose norm output
    feeds only those linears (pre-norm blocks: OPT with ``do_layer_norm_before``, GPT-2); a
    post-norm block's norms (BERT, OPT-350m) also feed the residual stream: none."""
    if getattr(block, "do_layer_norm_before", True) is False:
        return []
    return [(p, ls) for p, ls in scale_pairs(block) if is_norm(block.get_submodule(p))]


def _fold_layernorm(norm: nn.Module, lins: list[nn.Linear]) -> None:
    """``W <- W diag(g)``, ``b <- b + W beta`` for each linear, then ``g <- 1``, ``beta <- 0``
    (the norm's output then is the bare normalized input; a linear without a bias gets one
    when ``beta`` is not zero)."""
    g = norm.weight.detach().double()
    beta = getattr(norm, "bias", None)
    with torch.no_grad():
        for lin in lins:
            w = lin.weight.detach().double()
            if beta is not None and bool((beta != 0).any()):
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(
                        lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
                lin.bias.copy_((lin.bias.double() + w @ beta.double()).to(lin.bias.dtype))
            lin.weight.copy_((w * g[None, :]).to(lin.weight.dtype))
        norm.weight.fill_(1.0)
        if beta is not None:
            beta.zero_()


def _rotate_any_block(block: nn.Module, seed: int | None, index: int, notes: dict[str, str],
                      name: str) -> dict[str, str]:
    """Any block (LayerNorm ones: OPT, GPT-2, BERT): each foldable norm
    (:func:`foldable_norms`) gets its weight and bias folded into its linears, whose input
    columns are rotated, and its output rotated online (:class:`~qkern.nn.HadamardOutput`:
    rotating a LayerNorm's output is exact, its mean subtraction comes before); every other
    linear is rotated on its input (:class:`~qkern.nn.HadamardInput`)."""
    linearize_conv1d(block)
    names = block_linears(block)
    if not names:
        raise ValueError(f"RotationConfig: {type(block).__name__} has no Linear layers")
    norms = foldable_norms(block)
    done = {n for _, lins in norms for n in lins}
    return _rotate_sites(block, norms, [n for n in names if n not in done], _fold_layernorm,
                         seed, index, notes, name)


def _fold_norm(norm: nn.Module, lins: list[nn.Linear]) -> None:
    """``W <- W diag(w)`` for each linear, then ``w <- 1``."""
    w = norm.weight.detach().double()
    with torch.no_grad():
        for lin in lins:
            lin.weight.copy_((lin.weight.double() * w[None, :]).to(lin.weight.dtype))
        norm.weight.fill_(1.0)


def _rotate_rows(lin: nn.Linear, signs: torch.Tensor) -> None:
    """``y <- y R`` for the linear's output: ``W <- R^T W``, ``b <- b R``."""
    with torch.no_grad():
        lin.weight.copy_(rotate(lin.weight.detach().float().T, signs).T.to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_(rotate(lin.bias.detach().float(), signs).to(lin.bias.dtype))


def _embeddings(model: nn.Module, list_name: str) -> tuple[nn.Embedding, nn.Linear, nn.Module]:
    """(input embedding, LM head, final norm) of a decoder-only Llama-style model."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if get_in else getattr(getattr(model, "model", None), "embed_tokens", None)
    head = get_out() if get_out else getattr(model, "lm_head", None)
    parent = model.get_submodule(list_name.rpartition(".")[0])
    norm = getattr(parent, "norm", None)
    if not (isinstance(emb, nn.Embedding) and type(head) is nn.Linear and norm is not None
            and is_norm(norm) and getattr(norm, "bias", None) is None):
        raise ValueError(f"rotate_model: {type(model).__name__} is not a Llama-style causal LM "
                         "(embed_tokens -> RMSNorm blocks -> norm -> lm_head)")
    return emb, head, norm


def rotate_model(model: nn.Module, seed: int | None = 0) -> nn.Module:
    """QuaRot's rotation of the whole residual stream, in place: ``h <- h R`` everywhere
    between the blocks (``R = diag(s) H^T / sqrt(d)``), folded into the weights: the
    embeddings ``E <- E R``; per block the RMSNorm weights folded into q/k/v and gate/up,
    whose input columns get ``W <- W R``, and o_proj / down_proj outputs ``W <- R^T W``; the
    final norm folded into the LM head, ``W <- W R``. Plus the online Hadamard on down_proj's
    input (:class:`~qkern.nn.HadamardInput`). A tied LM head is untied (the final norm's
    weight is folded into it only). Then quantize with any LLM method, e.g.
    ``quantize_model(rotate_model(copy.deepcopy(m)), GPTQConfig(...), cal)``: its blocks hold
    the linears as ``mlp.down_proj.linear``. ``seed`` None: the plain Hadamard."""
    from_list, blocks = find_blocks(model)
    for blk in blocks:
        _llama_style(blk)
    emb, head, final = _embeddings(model, from_list)
    d = emb.embedding_dim
    signs = _site_signs(d, seed, -1, 0)
    if signs is None:
        raise ValueError(f"rotate_model: no Hadamard matrix of the hidden size {d}")
    if head.weight is emb.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        if hasattr(getattr(model, "config", None), "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
    with torch.no_grad():
        emb.weight.copy_(rotate(emb.weight.detach().float(), signs).to(emb.weight.dtype))
    _fold_norm(final, [head])
    _rotate_columns(head, signs)
    for i, blk in enumerate(blocks):
        for norm_name, lin_names in NORM_SITES:
            lins = [blk.get_submodule(n) for n in lin_names]
            _fold_norm(blk.get_submodule(norm_name), lins)
            for lin in lins:
                _rotate_columns(lin, signs)
        for out_name in ONLINE_SITES:
            _rotate_rows(blk.get_submodule(out_name), signs)
        down = blk.get_submodule("mlp.down_proj")
        s2 = _site_signs(down.in_features, seed, i, 1)
        if s2 is not None:
            _rotate_columns(down, s2)
            _replace(blk, "mlp.down_proj", HadamardInput(down, s2))
    return model


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


@register_quantizer(RotationConfig)
class RotationQuantizer(SequentialQuantizer):
    """Rotates each block (:func:`rotate_block`), then quantizes its linears (``then`` or
    round to nearest), with int8 dynamic activations when ``act_bits == 8``. ``constraints``
    apply to the round to nearest as RTNConfig's (``then`` carries its own, the same); with
    ``act_bits=8`` the activation scales are computed at run time: ``pow2_scales`` and
    ``per_tensor`` are refused there (docs/hardware.md)."""

    GRAMS = False
    NEEDS_DATA = False
    APPLIES_CONSTRAINTS = True

    def check_constraints(self, cfg, name: str) -> None:
        """The base rules, and with ``act_bits=8`` those of dynamic int8 activations (per
        token, or per block of 32 along K on the int2-4 fast kernels)."""
        super().check_constraints(cfg, name)
        if cfg.act_bits == 8:
            check_dynamic_activations(cfg.constraints, True,
                                      f"RotationConfig(act_bits=8) (layer {name})",
                                      "use act_bits=None (weight-only)")

    def process_block(self, ctx: BlockContext) -> None:
        cfg = self.config
        seed = cfg.seed if cfg.random_signs else None
        renames = rotate_block(ctx.block, seed, ctx.index, self.notes, ctx.name)
        for old, new in renames.items():
            if old in ctx.layers:
                ctx.layers[new] = ctx.layers.pop(old)
        for group in ctx.groups:
            group[:] = [renames.get(n, n) for n in group]
        ctx.pairs.clear()  # the norms are wrapped: nothing is left to fold scales into

    def quantize_layer(self, name: str, linear: nn.Linear, gram: torch.Tensor | None,
                       cfg) -> nn.Module:
        q = super().quantize_layer(name, linear, gram, cfg)
        if self.config.act_bits == 8 and isinstance(q, QuantLinear):
            q = a8_linear(q)
        return q


def a8_linear(q: QuantLinear) -> QuantLinear:
    """``q`` with int8 activations on qkern's kernels: int8 per-channel weights get per-token
    dynamic int8 activations (``act="int8_dynamic"``, W8A8); int2-4 group-wise weights the
    ``mode="fast"`` kernels, which quantize the activations to int8 per block of 32 along K
    and use integer dot products (W4A8). The weight is rebuilt from ``q``'s own codes, scales
    and zero points (checked equal)."""
    w = q.weight_q
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(q.dequantize_weight())
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    kw = {"act": "int8_dynamic"} if w.format.name == "int8" else {"mode": "fast"}
    g = w.group_size if w.granularity == "group" else None
    new = QuantLinear.from_float(lin, w.format.name, group_size=g,
                                 symmetric=w.zero_point is None, scale=w.scale,
                                 zero_point=w.zero_point, **kw)
    if not torch.equal(new.dequantize_weight(), q.dequantize_weight()):
        raise AssertionError("a8_linear: the rebuilt weight differs from the layer's")
    return new
