"""The kernel table (``base``): one class per fused matmul family, one module each. Every module
of this package is imported here, so adding a kernel is adding a module with one
``@register``-ed :class:`Kernel` subclass."""

import importlib
import pkgutil

from .base import FALLBACK, Kernel, Selection, by_name, register, select, table, unregister

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FALLBACK", "Kernel", "Selection", "by_name", "register", "select", "table",
           "unregister"]
