"""Small conventional models on scikit-learn's ``load_digits`` (1797 real 8x8 handwritten
digits, 10 classes): an MLP and a CNN trained deterministically in a few seconds on the CPU,
the float baselines of qkern's PTQ tables and tests.

    data = load_data()                       # fixed train / calibration / test split
    mlp = train("mlp", data)                 # ~97 % test accuracy
    accuracy(mlp, data.x_test, data.y_test)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsData", "accuracy", "finetune", "load_data", "make_model", "train"]


@dataclass
class DigitsData:
    x_train: torch.Tensor  # (n, 1, 8, 8) float32, pixel values / 16
    y_train: torch.Tensor
    x_calib: torch.Tensor  # a slice of the training set, for calibration
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(seed: int = 0, test_fraction: float = 0.25, n_calib: int = 256) -> DigitsData:
    """The digits split into train / test by a seeded permutation; the calibration batch is
    the first ``n_calib`` training images (never test images)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the test and demo setups install it
        raise ImportError("the digits models need scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return DigitsData(x[tr], y[tr], x[tr][:n_calib], x[te], y[te])


def make_model(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64),
                             nn.ReLU(), nn.Linear(64, 10))
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                             nn.Linear(64, 10))
    if kind == "cnn_bn":  # XNOR-Net's block order: BatchNorm -> (binary) conv / linear
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.BatchNorm1d(32 * 4 * 4), nn.Linear(32 * 4 * 4, 64),
                             nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 10))
    raise ValueError(f"kind must be 'mlp', 'cnn' or 'cnn_bn', got {kind!r}")


def train(kind: str, data: DigitsData | None = None, epochs: int = 30, seed: int = 0,
          lr: float = 3e-3, batch: int = 64) -> nn.Module:
    """A float model trained with Adam on the training split (deterministic for a seed)."""
    data = data or load_data()
    torch.manual_seed(seed)
    model = make_model(kind)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    return model.eval()


def finetune(model: nn.Module, data: DigitsData, epochs: int = 6, lr: float = 5e-3,
             seed: int = 0, batch: int = 64, extra_loss=None,
             lr_scale: dict[str, float] | None = None, after_step=None) -> nn.Module:
    """Fine-tunes ``model`` in place (e.g. a QAT-prepared one): SGD with momentum 0.9 and a
    cosine learning-rate schedule, as the LSQ paper fine-tunes; ``extra_loss(model)`` is added
    to the cross entropy (QAT's regularization); ``lr_scale``: parameter-name suffix -> a
    factor on ``lr`` for those parameters (e.g. TTQ's ``w_p`` / ``w_n``, whose gradients are
    sums over a layer); ``after_step(model)`` runs after each optimizer step (BinaryConnect's
    weight clip). Returns the model in eval mode."""
    scale = lr_scale or {}
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        f = next((v for k, v in scale.items() if name.endswith(k)), 1.0)
        groups.setdefault(f, []).append(p)
    opt = torch.optim.SGD([{"params": ps, "lr": lr * f} for f, ps in groups.items()], lr=lr,
                          momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    g = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())
