"""The example model: a small CNN on scikit-learn's digits (8x8 grey images, 10 classes).

The data ships inside scikit-learn, so training needs no download. Splits are disjoint and
deterministic for a seed: train, calibration (for int8 quantization) and evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers: input (N, 1, 8, 8) in [0, 1]."""

    def __init__(self, channels: int = 16, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_splits(seed: int, calibration_size: int, eval_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / calibration / eval splits of the digits, as float32 NCHW in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    if calibration_size + eval_size >= len(x) - 100:
        raise ValueError(
            f"calibration_size + eval_size = {calibration_size + eval_size} leaves fewer than 100 of "
            f"the {len(x)} digits for training"
        )
    order = np.random.default_rng(seed).permutation(len(x))
    ev = order[:eval_size]
    cal = order[eval_size : eval_size + calibration_size]
    tr = order[eval_size + calibration_size :]
    return {"train": (x[tr], y[tr]), "calibration": (x[cal], y[cal]), "eval": (x[ev], y[ev])}


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int,
          seed: int, log_every: int = 1, logger=None) -> list[float]:
    """Adam on cross-entropy; returns the mean loss of each epoch."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(xt))
        if logger and (epoch + 1) % log_every == 0:
            logger.info("epoch %d/%d loss %.4f", epoch + 1, epochs, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())
