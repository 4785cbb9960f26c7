"""One module per quantization method, each holding its config (``@config_class``) and its
quantizer (``@register_quantizer``) or its functions.

Every module in this folder is imported here by discovery, so its decorators run and its
config is known to ``qkern.quantize_model`` / ``BaseConfig.from_json``: adding an algorithm
is adding one file (tests/test_registry.py then asks for its config to be exported from
``qkern.quantization``)."""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["MODULES"]

#: the algorithm modules, by name
MODULES = {m.name: importlib.import_module(f"{__name__}.{m.name}")
           for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)}
