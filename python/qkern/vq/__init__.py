"""Vector and codebook quantization: one small interface (train / encode / decode, code sizes,
save / load; :mod:`.base`) over k-means, product, residual, additive and lattice quantizers and
learned scalar grids, with the hot loops in C++."""

from .base import NotTrainedError, VQBase, as_codes, as_vectors
from .lattice import LatticeQuantizer
from .lut import LUTQuantizer

__all__ = ["NotTrainedError", "VQBase", "as_codes", "as_vectors"]
__all__ += ["LatticeQuantizer", "LUTQuantizer"]
