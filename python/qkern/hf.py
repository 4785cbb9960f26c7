"""qkern as a transformers quantization method (the optional ``qkern[hf]`` extra).

Importing ``qkern.hf`` (also done by ``import qkern`` when transformers is already imported,
by the first transformers model qkern quantizes, and by ``qkern.from_pretrained``) registers
``"qkern"`` with transformers' plugin API: :class:`QkernConfig` as its quantization config and
:class:`~qkern.interop.hf_quantizer.QkernHfQuantizer` as its quantizer. Then::

    from transformers import AutoModelForCausalLM
    import qkern, qkern.hf

    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=qkern.hf.QkernConfig(qkern.RTNConfig(bits=4, group_size=32)))
    model.save_pretrained(out)                          # qkern's packed buffers + the config
    again = AutoModelForCausalLM.from_pretrained(out)   # the same QuantLinear layers

and a model quantized by ``qkern.quantize_model`` (or ``convert`` / ``replace_linear`` /
``qkern.load``) gets
the same config attached (:func:`attach`), so its ``save_pretrained`` folder loads back too.
``config.json``'s ``quantization_config`` holds ``quant_method: "qkern"``, the qkern config
that was run (``config``, its JSON as ``qkern.save`` writes it) and one spec per quantized
layer (``layers``: type, format, group size, symmetric, activation mode, kernel ...), which
is what loading rebuilds; the packed buffers are ordinary tensors of ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

try:
    from transformers import PreTrainedModel
    from transformers.quantizers import register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # the optional dependency
    raise ImportError(f"qkern.hf needs transformers >= 5 ({e}): pip install 'qkern[hf]'") from e

from .interop.hf_quantizer import QkernHfQuantizer, on_load_problem
from .io.serialization import FORMAT_VERSION, layer_specs
from .quantization import BaseConfig, registered_configs
from .version import __version__

__all__ = ["METHOD", "QkernConfig", "QkernHfQuantizer", "attach", "on_load_problem"]

METHOD = "qkern"


def _config_class(method: str) -> type[BaseConfig]:
    """The qkern config class ``method`` names: its class name ("RTNConfig") or that name
    without "Config", any case ("rtn", "hqq", "GPTQ")."""
    known = registered_configs()
    want = method.lower()
    for cls_name, cls in known.items():
        if want in (cls_name.lower(), cls_name.lower().removesuffix("config")):
            return cls
    names = sorted(n.removesuffix("Config").lower() for n in known)
    raise ValueError(f"QkernConfig: unknown method {method!r}; known: {', '.join(names)}")


class QkernConfig(QuantizationConfigMixin):
    """transformers' ``quantization_config`` for qkern.

    ``QkernConfig(config)`` with a qkern config (``qkern.RTNConfig(bits=4, group_size=32)``,
    ``qkern.HQQConfig()``, or its dict as ``config.to_dict()`` gives it), or flat:
    ``QkernConfig(method="rtn", bits=4, group_size=32)`` (``method``: the config class name
    with or without "Config", any case; the other keywords are its fields).

    ``layers`` ({layer name: spec}) describes a quantized model; ``save_pretrained`` fills it
    and ``from_pretrained`` of a saved folder rebuilds exactly those layers. Given to
    ``from_pretrained`` of a float checkpoint, ``config`` quantizes it while it loads: the
    data-free, layer-by-layer LLM methods only (RTN, HQQ: see :func:`on_load_problem`).
    """

    def __init__(self, config: BaseConfig | dict | None = None, *, method: str | None = None,
                 layers: dict[str, dict] | None = None, quant_method: str = METHOD,
                 format_version: str = FORMAT_VERSION, qkern_version: str | None = None,
                 **fields):
        if quant_method != METHOD:
            raise ValueError(f"QkernConfig: quant_method must be {METHOD!r}, got "
                             f"{quant_method!r}")
        if format_version != FORMAT_VERSION:
            raise ValueError(f"QkernConfig: format_version {format_version!r}; this qkern "
                             f"reads {FORMAT_VERSION!r} (a newer qkern wrote it?)")
        if method is not None:
            if config is not None:
                raise TypeError("QkernConfig: give a config or method= with its fields, not "
                                "both")
            if not isinstance(method, str):
                raise TypeError(f"QkernConfig: method must be a string, got "
                                f"{type(method).__name__}")
            cls = _config_class(method)
            names = {f.name for f in dataclasses.fields(cls)}
            if set(fields) - names:
                raise ValueError(f"QkernConfig: {cls.__name__} has no field(s) "
                                 f"{sorted(set(fields) - names)}; fields: {sorted(names)}")
            config = cls(**fields)
        elif fields:
            raise TypeError(f"QkernConfig: unexpected keyword(s) {sorted(fields)} (fields of "
                            "a method go with method=..., e.g. QkernConfig(method='rtn', "
                            "bits=4))")
        if isinstance(config, dict):
            config = BaseConfig.from_dict(config)
        if config is not None and not isinstance(config, BaseConfig):
            raise TypeError(f"QkernConfig: config must be a qkern config (e.g. "
                            f"qkern.RTNConfig(bits=4)) or its dict, got "
                            f"{type(config).__name__}")
        if layers is not None and not (isinstance(layers, dict) and all(
                isinstance(k, str) and isinstance(v, dict) for k, v in layers.items())):
            raise TypeError("QkernConfig: layers must be a dict {layer name: spec dict}")
        self.quant_method = METHOD
        self.config = config
        self.layers = None if layers is None else dict(layers)
        self.format_version = FORMAT_VERSION
        self.qkern_version = qkern_version or __version__

    def to_dict(self) -> dict:
        return {"quant_method": METHOD, "format_version": self.format_version,
                "qkern_version": self.qkern_version,
                "config": None if self.config is None else self.config.to_dict(),
                "layers": None if self.layers is None else {k: dict(v) for k, v in
                                                            self.layers.items()}}


def attach(model: nn.Module) -> nn.Module:
    """Gives a transformers model with qkern-quantized layers what ``save_pretrained``
    needs to write a folder ``from_pretrained`` loads back: ``config.quantization_config``
    (a :class:`QkernConfig` with the model's ``qkern_config``) and the qkern quantizer
    (which checks the model when it is saved). Other models are returned untouched.
    ``quantize_model``, ``convert``, ``qkern.nn.replace_linear`` and ``qkern.load`` call it on
    what they return; call it yourself after putting quantized layers in by hand."""
    if not isinstance(model, PreTrainedModel) or not layer_specs(model):
        return model
    old = getattr(model, "hf_quantizer", None)
    if old is not None and not isinstance(old, QkernHfQuantizer):
        raise ValueError(f"this model is already quantized by transformers' "
                         f"{old.quantization_config.quant_method!r} method; qkern cannot "
                         "describe it for save_pretrained")
    cfg = QkernConfig(getattr(model, "qkern_config", None), layers=layer_specs(model))
    model.config.quantization_config = cfg
    model.hf_quantizer = QkernHfQuantizer(cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = METHOD
    return model


if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is None:  # registered once per process
    register_quantization_config(METHOD)(QkernConfig)
    register_quantizer(METHOD)(QkernHfQuantizer)
