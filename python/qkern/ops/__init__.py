"""torch.library ops of qkern: schemas + fake kernels (``schemas``), argument checks
(``checks``), the CPU kernels (``cpu`` and one module per matmul family) and the CUDA kernels
(``cuda``, ``cuda_quant``) when ``qkern._cuda`` was built.

Every module of this package is imported here (importing a module registers its kernels), so
adding an op module needs no import list; the CUDA modules only when ``qkern._cuda`` exists."""

import importlib
import pkgutil

from .._checks import HAS_CUDA_KERNELS
from .cpu import NonFiniteError

for _info in pkgutil.iter_modules(__path__):
    if HAS_CUDA_KERNELS or not _info.name.startswith("cuda"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["HAS_CUDA_KERNELS", "NonFiniteError"]
