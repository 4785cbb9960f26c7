"""What the format modules share: the quantized layers of a model and their codes, the float
tensors around them, the transformers config, and folders written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..io.safetensors import write_safetensors
from ..nn import QuantLinear
from ..tensor import QTensor

__all__ = ["check_layers", "float_tensors", "hf_config", "hf_skeleton", "quantized_layers",
           "write_folder", "write_json", "write_tensors"]


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The QuantLinear layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def check_layers(model: nn.Module, fmt: str,
                 why_not: Callable[[str, QuantLinear, QTensor], str | None]
                 ) -> dict[str, QTensor]:
    """Every quantized layer's QTensor, read back from its buffers; ValueError naming each
    layer ``fmt`` cannot hold (``why_not`` says why) and when there is no quantized layer."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{fmt} export: the model has no quantized layers (QuantLinear); "
                         "quantize it first (qkern.quantize_model)")
    out, bad = {}, []
    for name, m in layers.items():
        try:
            q = m.quantized_weight()
        except NotImplementedError as e:
            bad.append(f"{name}: {e}")
            continue
        why = why_not(name, m, q)
        if why is not None:
            bad.append(f"{name}: {why}")
        out[name] = q
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ValueError(f"{fmt} export cannot hold these layers exactly:\n  "
                         + "\n  ".join(bad[:8]) + more)
    return out


def float_tensors(model: nn.Module, skip_tied: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict without the quantized layers' packed buffers (their biases kept as
    ``<layer>.bias``); a tied ``lm_head.weight`` is left out when the config says the
    embeddings are tied (transformers ties it again on load)."""
    quant = quantized_layers(model)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in quant and leaf != "bias":
            continue
        out[key] = t
    cfg = getattr(model, "config", None)
    if skip_tied and getattr(cfg, "tie_word_embeddings", False):
        for key in [k for k in out if k.endswith("lm_head.weight")]:
            del out[key]
    return out


def hf_config(model: nn.Module, fmt: str) -> dict:
    """The transformers config of ``model`` as a dict (ValueError when it has none)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise ValueError(f"{fmt} export needs a transformers model (one with .config); got "
                         f"{type(model).__name__}. Load the model with transformers (or "
                         "qkern.models.load_pretrained) before quantizing it")
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    return d


def hf_skeleton(path: Path, what: str = "importing a checkpoint folder") -> nn.Module:
    """The float32 transformers model of ``path/config.json`` (its ``architectures``; the
    ``quantization_config`` dropped), in eval mode, its weights neither read nor initialized:
    the importers fill them."""
    try:
        import transformers  # optional dependency: only a folder import needs it
        from transformers.initialization import no_init_weights
    except ImportError as e:
        raise ImportError(f"{what} needs transformers: pip install 'qkern[hf]'") from e
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (a transformers model folder has one)")
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with no_init_weights():
            if cls is not None and hasattr(cls, "_from_config"):
                model = cls._from_config(config, dtype=torch.float32)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config,
                                                                      dtype=torch.float32)
    finally:
        torch.set_default_dtype(prev)
    return model.float().eval()


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_folder(out: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Calls ``fill(tmp)`` to write the files of a folder into a temporary folder next to
    ``out``, then gives it the name ``out`` in one rename, so a reader never sees half a
    checkpoint. An existing ``out`` is refused unless ``overwrite=True`` (then replaced)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".qkern-tmp", dir=out.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".qkern-old",
                                        dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_tensors(path: Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """One safetensors file (``{"format": "pt"}`` metadata, as transformers writes)."""
    write_safetensors(path, tensors, metadata={"format": "pt", **(metadata or {})},
                      overwrite=True)
