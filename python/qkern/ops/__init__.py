"""torch.library ops of qkern: schemas + fake kernels, the CPU kernels, and the CUDA kernels
when ``qkern._cuda`` was built."""

from . import (  # noqa: F401  (importing a module defines its ops and registers kernels)
    bits,
    cpu,
    fp8,
    lut4,
    schemas,
    w4,
    w8,
    w23,
)
from .cpu import NonFiniteError

try:
    from .. import _cuda  # noqa: F401
except ImportError:
    HAS_CUDA_KERNELS = False
else:
    HAS_CUDA_KERNELS = True
    from . import cuda  # noqa: F401  (registers CUDA kernels)

__all__ = ["HAS_CUDA_KERNELS", "NonFiniteError"]
