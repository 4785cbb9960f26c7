"""qkern: quantization for neural networks, built from the numbers up."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

from . import _C, companding, fixed_point, formats, logdomain, nn, observers, ops  # noqa: F401
from .interop import export, from_pretrained
from .io.serialization import load, save
from .io.skeleton import empty_init
from .nn.integer import IntegerModel
from .packing import pack_bits, pack_int32, unpack_bits, unpack_int32
from .quantization import (
    ActivationOnlyConfig,
    AdaRoundConfig,
    AWQConfig,
    DynamicConfig,
    DynamicWeightOnlyConfig,
    GPTQConfig,
    HardwareConstraints,
    HQQConfig,
    IntegerOnlyConfig,
    LLMInt8Config,
    OmniQuantConfig,
    QATConfig,
    RotationConfig,
    RTNConfig,
    SmoothQuantConfig,
    StaticConfig,
    WeightOnlyConfig,
    ZeroQuantConfig,
    convert,
    hardware_cost,
    prepare,
    quantize_model,
)
from .quantize import QuantizeGradientWarning, fake_quantize, quantize
from .tensor import PackedQTensor, QTensor, dequantize
from .version import __version__ as __version__

__all__ = [
    "AWQConfig",
    "ActivationOnlyConfig",
    "AdaRoundConfig",
    "DynamicConfig",
    "DynamicWeightOnlyConfig",
    "GPTQConfig",
    "QATConfig",
    "HQQConfig",
    "HardwareConstraints",
    "IntegerModel",
    "IntegerOnlyConfig",
    "LLMInt8Config",
    "OmniQuantConfig",
    "PackedQTensor",
    "QTensor",
    "QuantizeGradientWarning",
    "RTNConfig",
    "RotationConfig",
    "SmoothQuantConfig",
    "StaticConfig",
    "WeightOnlyConfig",
    "ZeroQuantConfig",
    "companding",
    "convert",
    "hardware_cost",
    "dequantize",
    "empty_init",
    "export",
    "fake_quantize",
    "formats",
    "from_pretrained",
    "get_isa",
    "available_isas",
    "get_num_threads",
    "load",
    "pack_bits",
    "pack_int32",
    "prepare",
    "quantize",
    "quantize_model",
    "save",
    "set_isa",
    "set_num_threads",
    "unpack_bits",
    "unpack_int32",
]


def set_num_threads(n: int) -> None:
    """Threads used by qkern's CPU kernels (default: torch's intra-op thread count), at most
    ``qkern._C.max_num_threads()`` (8 x the hardware threads). A process forked from one that
    used the pool gets a fresh pool of the same size at its first parallel op."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_threads must be a positive int, got {n!r}")
    most = _C.max_num_threads()
    if n > most:
        raise ValueError(f"num_threads must be at most {most} (8 x the hardware threads: more "
                         f"only add scheduling overhead), got {n}")
    _C.set_num_threads(n)


def get_num_threads() -> int:
    return _C.get_num_threads()


def set_isa(isa: str) -> None:
    """Kernel path: 'amx' (the avx512 level + AMX-TILE / AMX-INT8: the int8 W8A8 product on the
    tile unit, other kernels as 'avx512'), 'avx512' (AVX-512 F/BW/VL/DQ + VNNI), 'avx2' (AVX2 +
    FMA + F16C), 'scalar' or 'auto' (the best the CPU has, the default). At import,
    ``QKERN_ISA=scalar|avx2|avx512|amx``
    in the environment picks the starting level and ``QKERN_FORCE_SCALAR=1`` forces 'scalar'.
    A path the CPU lacks falls back to the next lower one, and so does a kernel family without
    a path at that level. Integer results are bit-identical on every path; float results too,
    except where docs/numerics.md states a bound."""
    _C.set_isa(isa)


def get_isa() -> str:
    return _C.get_isa()


def available_isas() -> list[str]:
    """The kernel paths this CPU can run, lowest first: 'scalar', then 'avx2', 'avx512', 'amx'."""
    out = ["scalar"]
    if _C.cpu_has_avx2():
        out.append("avx2")
        if _C.cpu_has_avx512():
            out.append("avx512")
            if _C.cpu_has_amx():
                out.append("amx")
    return out


_C.set_num_threads(min(max(1, torch.get_num_threads()), _C.max_num_threads()))

def _hf_attach(model: torch.nn.Module) -> None:
    """A transformers model that qkern quantized gets its ``QkernConfig`` (``qkern.hf.attach``)
    so that ``save_pretrained`` writes a folder that loads back. ``qkern.hf`` (which loads
    transformers' quantizer machinery, ~2 s) is imported here, for the first transformers
    model, not by ``import qkern``."""
    if "transformers" in sys.modules and hasattr(model, "save_pretrained"):
        importlib.import_module(".hf", __name__).attach(model)


nn.on_quantized(_hf_attach)
if "transformers" in sys.modules:  # already paid for: register "qkern" with transformers now
    importlib.import_module(".hf", __name__)


def __getattr__(name: str):
    # qkern.hf, qkern.kv (transformers), qkern.vq, qkern.lora, qkern.mixed_precision,
    # qkern.signal, qkern.decompose, qkern.streaming, qkern.mixed_choice: imported on first use
    if name in ("hf", "vq", "kv", "lora", "mixed_precision", "mixed_choice", "signal",
                "decompose", "streaming"):
        return importlib.import_module(f".{name}", __name__)
    if name == "quantize_pretrained":  # qkern.streaming (transformers): imported on first use
        return importlib.import_module(".streaming", __name__).quantize_pretrained
    raise AttributeError(f"module 'qkern' has no attribute {name!r}")
