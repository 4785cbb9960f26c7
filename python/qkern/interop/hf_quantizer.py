"""qkern inside ``transformers.PreTrainedModel.from_pretrained`` / ``save_pretrained``: the
``HfQuantizer`` that :mod:`qkern.hf` registers as ``"qkern"`` (transformers 5.x plugin API).

Two ways in:

- **quantize on load** (``from_pretrained(dir, quantization_config=QkernConfig(...))`` on a
  float checkpoint): before the weights load, the plan is made on the empty (meta) model as
  ``qkern.quantize_model`` makes it (the linears inside the transformer blocks, ``include`` /
  ``exclude`` / ``overrides``, the layers no fused kernel runs left float); then each planned
  weight, as transformers reads it from the checkpoint, is turned into a float32
  ``nn.Linear`` and quantized by the config's own quantizer (``quantize_layer``, the
  function ``quantize_model`` calls) and the float weight is dropped. Only one float weight
  is alive at a time. Methods that need calibration data or transform whole blocks are
  refused: quantize those with ``qkern.quantize_model`` and ``save_pretrained`` the result.
- **pre-quantized** (a folder whose ``config.json`` holds a qkern ``quantization_config``):
  each layer the config's ``layers`` lists is rebuilt (``qkern.io.serialization``'s layer
  specs, as ``qkern.load`` does) with its buffers on the meta device, the checkpoint's key
  list is checked to hold every one of them, transformers loads them, and the loaded values
  go through the checks ``qkern.load`` applies.

One way out: ``save_pretrained`` asks :meth:`QkernHfQuantizer.get_state_dict_and_metadata`,
which re-reads the model's quantized layers into the config's ``layers`` and refuses (ValueError)
a model a fresh ``from_pretrained`` could not rebuild exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from ..io.serialization import BadFile, check_loaded_layer, layer_specs, rebuild_layer
from ..nn import QuantLinear
from ..quantization import SequentialQuantizer, find_blocks, quantizer_for, replace_module
from ..quantization.blocks import block_linears, is_conv1d
from ..quantization.layers import warn_notes
from ..version import __version__

__all__ = ["QkernHfQuantizer", "fresh_model", "on_load_problem", "placeholder", "read_quant_method",
           "saving_problems", "state_dict_to_save", "untie_quantized"]


@contextlib.contextmanager
def _cpu_float32():
    """Real CPU float32 tensors inside transformers' meta-device / low-precision init."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(old)


def on_load_problem(config) -> str | None:
    """Why qkern config ``config`` cannot quantize a model while transformers loads it (None:
    it can): only LLM weight methods that quantize each linear on its own, without data."""
    q = quantizer_for(config)
    name = type(config).__name__
    if not isinstance(q, SequentialQuantizer):
        return (f"{name} is not one of qkern's LLM weight methods (RTNConfig, HQQConfig ...) "
                "that quantize each linear on its own")
    why = q.needs_calibration()
    if why:
        return f"{name} needs calibration data (it {why})"
    for x in q.chain():
        if (type(x).process_block is not SequentialQuantizer.process_block
                or type(x).quantize_block is not SequentialQuantizer.quantize_block):
            return f"{type(x.config).__name__} transforms whole transformer blocks"
    return None


def placeholder(mod: nn.Module, name: str) -> nn.Module:
    """A float32 layer of ``mod``'s kind and shape on the meta device (no memory), for a
    quantized layer to be built on from its shape before its saved tensors load.
    transformers' ``Conv1D`` becomes its ``nn.Linear`` (as quantization did)."""
    if type(mod) is nn.Linear or is_conv1d(mod):
        n, k = (mod.weight.shape[1], mod.weight.shape[0]) if is_conv1d(mod) else \
            mod.weight.shape
        return nn.Linear(k, n, bias=mod.bias is not None, device="meta")
    if type(mod) is nn.Embedding:
        return nn.Embedding(mod.num_embeddings, mod.embedding_dim, mod.padding_idx,
                            device="meta")
    if type(mod) in (nn.Conv1d, nn.Conv2d):
        return copy.deepcopy(mod).to("meta").float()
    raise ValueError(f"layer {name!r} is a {type(mod).__name__} in this model; qkern "
                     "rebuilds quantized layers on nn.Linear, transformers' Conv1D, "
                     "nn.Conv1d/2d and nn.Embedding only")


class _Checkpoint:
    """The tensor names of a checkpoint's safetensors files (headers only) and lazy reads of
    single tensors, under the model's names (with or without ``prefix.``)."""

    def __init__(self, files: list[str] | None, prefix: str):
        self.where: dict[str, str] = {}
        self.prefix = prefix
        for f in files or []:
            if str(f).endswith(".safetensors"):
                with safe_open(os.fspath(f), framework="pt", device="cpu") as h:
                    self.where.update((k, os.fspath(f)) for k in h.keys())
        self.known = bool(self.where)

    def key(self, name: str) -> str | None:
        for k in (name, f"{self.prefix}.{name}", name.removeprefix(f"{self.prefix}.")):
            if k in self.where:
                return k
        return None

    def get(self, name: str) -> torch.Tensor | None:
        k = self.key(name)
        if k is None:
            return None
        with safe_open(self.where[k], framework="pt", device="cpu") as h:
            return h.get_tensor(k)


class _QuantizeOnLoad(ConversionOps):
    """transformers' per-weight conversion op: the checkpoint weight of a planned linear in,
    its QuantLinear put in the model, nothing left for transformers to set."""

    def __init__(self, hf_quantizer: QkernHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None,
                **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        self.hf_quantizer.quantize_weight(model, full_layer_name, value, missing_keys)
        return {}


class QkernHfQuantizer(HfQuantizer):
    """transformers' side of qkern (see the module docstring). ``quantization_config``: a
    :class:`qkern.hf.QkernConfig`."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.plan: dict = {}  # layer name -> its qkern config (quantize on load)
        self.quantizer = None
        self.source = ""

    # ---- before loading ----------------------------------------------------------------
    def validate_environment(self, *args, device_map=None, **kwargs):
        cfg = self.quantization_config
        if isinstance(device_map, dict):
            bad = {v for v in device_map.values() if str(v) != "cpu"}
        else:
            bad = set() if device_map is None or str(device_map) == "cpu" else {device_map}
        if bad:
            raise ValueError(f"qkern loads quantized models onto the CPU (its kernels); got "
                             f"device_map={device_map!r}. Load without device_map, then "
                             "move the model if qkern has kernels for that device")
        if self.pre_quantized:
            if not cfg.layers:
                raise ValueError("the checkpoint's qkern quantization_config lists no "
                                 "quantized layers ('layers'): it was not written by "
                                 "save_pretrained of a qkern-quantized model")
        else:
            if cfg.config is None:
                raise ValueError("QkernConfig needs a qkern config to quantize on load, e.g. "
                                 "QkernConfig(qkern.RTNConfig(bits=4, group_size=32))")
            why = on_load_problem(cfg.config)
            if why:
                raise ValueError(f"cannot quantize while loading: {why}. Load the float "
                                 "model, run qkern.quantize_model(model, config, calibration) "
                                 "and save_pretrained the result")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.source = str(Path(checkpoint_files[0]).parent) if checkpoint_files else "checkpoint"
        if self.pre_quantized:
            self._rebuild_layers(model, checkpoint_files)
        else:
            self._make_plan(model)
        return model

    def _make_plan(self, model) -> None:
        """The layers ``quantize_model`` would quantize, decided on the meta model: block
        linears its config selects, minus the shapes no fused kernel runs (judged on block
        0, as the pipeline does)."""
        cfg = self.quantization_config.config
        q = self.quantizer = quantizer_for(cfg)
        list_name, blocks = find_blocks(model)

        def as_linear(mod):
            k, n = (mod.weight.shape if is_conv1d(mod) else mod.weight.shape[::-1])
            return nn.Linear(k, n, bias=False, device="meta")

        cannot, chosen = {}, 0
        with _cpu_float32():
            for rel in block_linears(blocks[0]):
                lin = as_linear(blocks[0].get_submodule(rel))
                c = q.layer_config(f"{list_name}.0.{rel}", lin)
                if c is None:
                    continue
                chosen += 1
                why = q.preflight(f"{list_name}.0.{rel}", lin, c)
                if why is not None:
                    cannot[rel] = why
        if chosen and len(cannot) == chosen:
            raise ValueError(f"{type(cfg).__name__}: no layer of the model can take it: "
                             f"{next(iter(cannot.values()))}; choose another bits / "
                             "group_size (see docs/llm.md)")
        for i, blk in enumerate(blocks):
            for rel in block_linears(blk):
                name = f"{list_name}.{i}.{rel}"
                c = q.layer_config(name, as_linear(blk.get_submodule(rel)))
                if c is not None and rel in cannot:
                    q.skipped[name] = cannot[rel]
                elif c is not None:
                    self.plan[name] = c

    def _rebuild_layers(self, model, checkpoint_files) -> None:
        layers = self.quantization_config.layers
        ckpt = _Checkpoint(checkpoint_files, model.base_model_prefix)
        missing = []
        for name, spec in layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise BadFile(f"{self.source}: the quantization_config lists layer {name!r}, "
                              f"which {type(model).__name__} does not have") from None
            float_mod = placeholder(old, name)
            with _cpu_float32():
                new = rebuild_layer(name, float_mod, spec, ckpt, self.source)
            if ckpt.known:
                missing += [f"{name}.{k}" for k in new.state_dict()
                            if ckpt.key(f"{name}.{k}") is None]
            replace_module(model, name, new.to("meta"))
            _spare_parents(model, name)
        if missing:
            more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
            raise BadFile(f"{self.source}: the checkpoint lacks tensors of its quantized "
                          f"layers: {', '.join(missing[:8])}{more}")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        owner, _, leaf = param_name.rpartition(".")
        return not self.pre_quantized and leaf == "weight" and owner in self.plan

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def quantize_weight(self, model, param_name: str, value: torch.Tensor,
                        missing_keys) -> None:
        """Quantizes the planned layer owning ``param_name`` from its checkpoint weight."""
        name = param_name.rpartition(".")[0]
        cfg = self.plan.pop(name)
        old = model.get_submodule(name)
        with _cpu_float32():
            w = value.detach().to("cpu", torch.float32)
            w = w.t() if is_conv1d(old) else w
            bias = getattr(old, "bias", None)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            with torch.no_grad():
                lin.weight.copy_(w)
                if bias is not None:  # a bias not loaded yet is set afterwards
                    lin.bias.copy_(torch.zeros(w.shape[0]) if bias.is_meta else bias.float())
            new = self.quantizer.quantize_layer(name, lin, None, cfg)
        new._is_hf_initialized = True
        replace_module(model, name, new)
        _spare_parents(model, name)
        if missing_keys is not None:
            missing_keys.discard(param_name)

    # ---- after loading -----------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized:
            for name in cfg.layers:
                mod = model.get_submodule(name)
                bad = [k for k, t in mod.state_dict(keep_vars=True).items()
                       if t.is_meta or not getattr(t, "_is_hf_initialized", False)]
                if bad:
                    raise BadFile(f"{self.source}: layer {name!r}: tensors {bad} were not "
                                  "loaded from the checkpoint")
                check_loaded_layer(self.source, name, mod)
        else:
            if self.plan:
                raise ValueError(f"{self.source}: the checkpoint holds no weight for "
                                 f"{sorted(self.plan)[:8]}: they were not quantized")
            warn_notes(self.quantizer.notes)
            self.quantizer.warn_skipped()
        _freeze_biases(model)
        if cfg.config is not None:
            model.qkern_config = cfg.config
        cfg.layers = layer_specs(model)
        return model

    # ---- saving ------------------------------------------------------------------------
    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def get_state_dict_and_metadata(self, model):
        """Called by ``save_pretrained`` before anything is written: the config's ``layers``
        re-read from the model, or ValueError when a fresh ``from_pretrained`` of the folder
        could not rebuild it exactly."""
        untie_quantized(model)
        fresh = fresh_model(model)
        state = state_dict_to_save(model, fresh)
        problems = saving_problems(model, fresh, state)
        if problems:
            more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
            raise ValueError("save_pretrained: this qkern model would not load back from the "
                             "folder:\n  " + "\n  ".join(problems[:8]) + more)
        self.quantization_config.layers = layer_specs(model)
        self.quantization_config.qkern_version = __version__  # the writer of the folder
        model.config.quantization_config = self.quantization_config
        return state, {"qkern_format": self.quantization_config.format_version}

    def _dequantize(self, model, dtype=None):
        for name, mod in list(model.named_modules()):
            if isinstance(mod, QuantLinear):
                lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(mod.dequantize_weight())
                    if mod.bias is not None:
                        lin.bias.copy_(mod.bias)
                replace_module(model, name, lin.to(dtype) if dtype is not None else lin)
        left = sorted(layer_specs(model))
        if left:
            raise ValueError(f"dequantize: qkern turns QuantLinear layers back into "
                             f"nn.Linear only; these stay quantized: {left[:8]}")
        return model


def _spare_parents(model: nn.Module, name: str) -> None:
    """Marks the modules above quantized layer ``name`` that hold no tensor of their own as
    initialized, so transformers' weight init after loading (run for missing keys; GPT-2's
    re-scales ``attn.c_proj.weight`` from the attention module) does not look for the
    ``weight`` a QuantLinear does not have. Their children are initialized (or loaded) on
    their own account."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        mod = model.get_submodule(".".join(parts[:i]))
        if next(mod.parameters(recurse=False), None) is None and \
                next(mod.buffers(recurse=False), None) is None:
            mod._is_hf_initialized = True


def _freeze_biases(model: nn.Module) -> None:
    """QuantLinear biases as qkern keeps them: float32, no gradient (transformers loads a
    bias as a trainable parameter of the checkpoint's dtype)."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.bias is not None:
            mod.bias = nn.Parameter(mod.bias.detach().float(), requires_grad=False)


def untie_quantized(model: nn.Module) -> None:
    """A quantized layer that was tied to another (the LM head and the input embeddings under
    ``tie_word_embeddings``) holds its own codes now: the config says so
    (``tie_word_embeddings=False``), or ``from_pretrained`` would tie a float weight the
    quantized layer does not have."""
    specs = layer_specs(model)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    owners = {n.rpartition(".")[0] for pair in tied.items() for n in pair}
    if owners & set(specs) and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def fresh_model(model: nn.Module) -> nn.Module:
    """The architecture of ``model`` built anew on the meta device (what ``from_pretrained``
    starts from)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model)(copy.deepcopy(model.config))


def state_dict_to_save(model: nn.Module, fresh: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict in the layout ``fresh`` loads: float ``nn.Linear`` layers that
    quantization made of transformers' ``Conv1D`` (GPT-2) get their weight transposed back."""
    out = model.state_dict()
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and name:
            try:
                was = fresh.get_submodule(name)
            except AttributeError:
                continue
            if is_conv1d(was):
                out[f"{name}.weight"] = mod.weight.detach().t().contiguous()
    return out


def saving_problems(model: nn.Module, fresh: nn.Module, state: dict) -> list[str]:
    """Why ``from_pretrained`` of ``state`` (what ``save_pretrained`` writes) would not
    rebuild ``model`` (empty: it would): each quantized layer must sit where the fresh model
    has a layer qkern rebuilds on, and every other tensor must fit a tensor of the fresh
    model (transformers would drop or reject it)."""
    specs = layer_specs(model)
    out = []
    for name in specs:
        try:
            placeholder(fresh.get_submodule(name), name)
        except AttributeError:
            out.append(f"{name}: a fresh {type(model).__name__} has no layer there")
        except ValueError as e:
            out.append(str(e))
    inside = tuple(f"{n}." for n in specs)
    own = fresh.state_dict()
    for k, t in state.items():
        if k.startswith(inside):
            continue
        if k not in own:
            out.append(f"{k}: a fresh {type(model).__name__} has no such tensor")
        elif own[k].shape != t.shape:
            out.append(f"{k}: shape {tuple(t.shape)}, a fresh {type(model).__name__} has "
                       f"{tuple(own[k].shape)}")
    return out


def read_quant_method(folder: Path) -> str | None:
    """``quantization_config.quant_method`` of ``folder/config.json`` (None: none there)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc.get("quant_method") if isinstance(qc, dict) else None
