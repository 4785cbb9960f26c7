"""The data sets of ``qkern bench vq`` (:mod:`.vq`), built deterministically and cached as
``.npz`` files under ``~/.cache/qkern`` (or the ``cache`` folder given):

- ``digits``: scikit-learn's ``load_digits`` (1797 images of 8 x 8 pixels, values 0..16, as
  64-d float32 vectors). A seeded permutation holds out ``n_queries`` of them as queries; the
  rest are both the training set and the searched base.
- ``minilm``: all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm; the model run by
  :mod:`qkern.models.bert`) of real WikiText-2 sentences, taken the way the MiniLM report takes
  them (:func:`qkern.tools.reports.minilm.sentences`: paragraphs split on " . ", headings and
  ``<unk>`` sentences dropped, evenly spaced through the file). Training vectors from
  ``wiki.valid.tokens``; base and queries from ``wiki.test.tokens`` (a seeded permutation
  holds ``n_queries`` out of the test sentences).

>>> ds = digits()
>>> ds.train.shape, ds.base.shape, ds.queries.shape
((1597, 64), (1597, 64), (200, 64))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...models.bert import embed, load_minilm
from ..reports.minilm import sentences

__all__ = ["VQData", "cache_dir", "digits", "load", "minilm", "DATASETS"]


@dataclass
class VQData:
    """One data set: float32 ``train`` (n_train, d), ``base`` (n_base, d) searched,
    ``queries`` (n_queries, d), and a one-line description."""

    name: str
    train: np.ndarray
    base: np.ndarray
    queries: np.ndarray
    note: str

    @property
    def d(self) -> int:
        return self.base.shape[1]


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """``cache`` if given, else ``$XDG_CACHE_HOME/qkern`` (``~/.cache/qkern``)."""
    if cache is not None:
        return Path(cache)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qkern"


def _split(x: np.ndarray, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(n_queries, int) or not 1 <= n_queries < x.shape[0]:
        raise ValueError(f"n_queries must be an int in 1..{x.shape[0] - 1}, got {n_queries!r}")
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    return x[np.sort(perm[n_queries:])], x[np.sort(perm[:n_queries])]


def _cached(path: Path, build) -> dict[str, np.ndarray]:
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return arrays


def digits(n_queries: int = 200, seed: int = 0,
           cache: str | os.PathLike | None = None, use_cache: bool = True) -> VQData:
    """sklearn's digits: ``n_queries`` held out as queries, the rest the training set and
    the base (see the module docstring)."""
    def build():
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - the test and bench setups install it
            raise ImportError("the digits data set needs scikit-learn "
                              "(pip install scikit-learn)") from e
        x = np.ascontiguousarray(load_digits().data, dtype=np.float32)
        base, queries = _split(x, n_queries, seed)
        return {"base": base, "queries": queries}

    path = cache_dir(cache) / f"vq_digits_q{n_queries}_s{seed}.npz"
    a = _cached(path, build) if use_cache else build()
    return VQData("digits", a["base"], a["base"], a["queries"],
                  f"sklearn load_digits, 64-d pixels 0..16: train = base = {len(a['base'])} "
                  f"images, {len(a['queries'])} held-out queries")


def minilm(n_train: int = 2000, n_test: int = 2400, n_queries: int = 200, seed: int = 0,
           cache: str | os.PathLike | None = None, use_cache: bool = True,
           progress: bool = True, batch: int = 128) -> VQData:
    """all-MiniLM-L6-v2 embeddings of ``n_train`` WikiText-2 valid sentences (training set)
    and ``n_test`` test sentences (``n_queries`` of them the queries, the rest the base);
    embedding the defaults takes about half a minute on 2 cores (a progress bar on stderr)."""
    if not isinstance(n_test, int) or n_test < 2:
        raise ValueError(f"n_test must be an int >= 2, got {n_test!r}")

    def build():
        train_s, test_s = sentences(n_train, "valid"), sentences(n_test, "test")
        model = load_minilm()
        out = []
        with tqdm(total=len(train_s) + len(test_s), desc="MiniLM embeddings", unit="sent",
                  disable=not progress) as bar:
            for sents in (train_s, test_s):
                parts = []
                for i in range(0, len(sents), batch):
                    parts.append(embed(model, sents[i:i + batch]))
                    bar.update(len(parts[-1]))
                out.append(torch.cat(parts).numpy().astype(np.float32))
        base, queries = _split(out[1], n_queries, seed)
        return {"train": out[0], "base": base, "queries": queries}

    path = cache_dir(cache) / f"vq_minilm_t{n_train}_b{n_test}_q{n_queries}_s{seed}.npz"
    a = _cached(path, build) if use_cache else build()
    return VQData("minilm", a["train"], a["base"], a["queries"],
                  f"all-MiniLM-L6-v2 embeddings (384-d, unit norm) of WikiText-2 sentences: "
                  f"train {len(a['train'])} valid sentences, base {len(a['base'])} and "
                  f"{len(a['queries'])} queries from test")


#: name -> builder(cache=..., progress=...) of the default-sized data set
DATASETS = {"digits": lambda cache=None, progress=True: digits(cache=cache),
            "minilm": lambda cache=None, progress=True: minilm(cache=cache, progress=progress)}


def load(name: str, cache: str | os.PathLike | None = None, progress: bool = True) -> VQData:
    """The data set ``name`` ('digits' or 'minilm') at its default size."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name](cache=cache, progress=progress)
