"""Vector and codebook quantization: one small interface (train / encode / decode, code sizes,
save / load; :mod:`.base`) over k-means, product, residual, additive and lattice quantizers and
learned scalar grids, with the hot loops in C++."""

from .base import NotTrainedError, VQBase, as_codes, as_vectors
from .kmeans import KMeans
from .lattice import LatticeQuantizer
from .linear import VQLinear
from .lut import LUTQuantizer
from .opq import OPQ
from .pq import ProductQuantizer, VectorQuantizer
from .rq import AdditiveQuantizer, MultiLevelVQ, ResidualQuantizer
from .vqvae import VQVAE, VQCodebook

__all__ = ["KMeans", "LUTQuantizer", "LatticeQuantizer", "NotTrainedError", "ProductQuantizer",
           "VQBase", "VQCodebook", "VQVAE", "VectorQuantizer", "as_codes", "as_vectors"]
__all__ += ["AdditiveQuantizer", "MultiLevelVQ", "OPQ", "ResidualQuantizer", "VQLinear"]
