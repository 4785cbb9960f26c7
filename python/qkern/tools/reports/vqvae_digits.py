"""The digits VQ-VAE figure of docs/vq.md: :class:`qkern.vq.VQVAE` (4 latent positions, 64
codes of dimension 8: 24 bits per image) trained on the training split of sklearn's
``load_digits`` (qkern.models.digits, seed 0), and a grid of held-out digits, originals above
their reconstructions, with the code size and the held-out MSE in the title.

``python -m qkern.tools.reports.vqvae_digits [--out docs/images/vqvae_digits.png]`` trains
(a few seconds on one core), prints the numbers and writes the PNG.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from ...models import digits as D
from ...vq import VQVAE
from .plots import pyplot

__all__ = ["figure", "run", "train"]

DEFAULT_OUT = Path(__file__).resolve().parents[4] / "docs" / "images" / "vqvae_digits.png"


def train(epochs: int = 40, seed: int = 0) -> tuple[VQVAE, np.ndarray, np.ndarray]:
    """The trained VQ-VAE and the (train, test) digits as (n, 64) pixel values in [0, 16]."""
    data = D.load_data()
    xtr = data.x_train.reshape(len(data.x_train), -1).numpy() * 16
    xte = data.x_test.reshape(len(data.x_test), -1).numpy() * 16
    return VQVAE(seed=seed).train(xtr, epochs=epochs), xtr, xte


def figure(q: VQVAE, xte: np.ndarray, columns: int = 12, rows: int = 2) -> tuple[bytes, dict]:
    """PNG bytes of ``rows`` pairs of lines (originals, reconstructions) of held-out digits,
    and the numbers of the title."""
    plt = pyplot()
    x_hat = q.reconstruct(xte)
    mse = float(((x_hat - xte) ** 2).sum(axis=1).mean())
    var = float(((xte - xte.mean(axis=0)) ** 2).sum(axis=1).mean())
    info = {"bits": q.code_size_bits, "mse": mse, "variance": var, "n_test": len(xte)}
    fig, axes = plt.subplots(2 * rows, columns, figsize=(columns * 0.55, 2 * rows * 0.62 + 0.5))
    for r in range(rows):
        for c in range(columns):
            i = r * columns + c
            for k, img in enumerate((xte[i], x_hat[i])):
                ax = axes[2 * r + k, c]
                ax.imshow(np.clip(img, 0, 16).reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * r, 0].set_ylabel("orig", fontsize=7)
        axes[2 * r + 1, 0].set_ylabel("VQ-VAE", fontsize=7)
    fig.suptitle(f"VQ-VAE on held-out digits: {info['bits']} bits / image, MSE {mse:.1f} "
                 f"({100 * mse / var:.0f} % of the variance {var:.0f})", fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=0.88, wspace=0.05, hspace=0.08)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue(), info


def run(out: str | Path = DEFAULT_OUT, epochs: int = 40) -> dict:
    q, _, xte = train(epochs=epochs)
    png, info = figure(q, xte)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    info.update(out=str(out), png_bytes=len(png), perplexity=q.history[-1]["perplexity"])
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qkern.tools.reports.vqvae_digits",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the PNG to write")
    ap.add_argument("--epochs", type=int, default=40)
    a = ap.parse_args(argv)
    info = run(a.out, a.epochs)
    print(f"{info['bits']} bits / image, held-out MSE {info['mse']:.2f} (variance "
          f"{info['variance']:.2f}, {info['n_test']} images), perplexity "
          f"{info['perplexity']:.1f}; wrote {info['out']} ({info['png_bytes']} bytes)")


if __name__ == "__main__":
    main()
